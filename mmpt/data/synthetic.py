"""Synthetic compositional image-text data: 1-2 coloured shapes with a caption that pins them down.

Why: a tiny, learnable, license-free stand-in for web image-text data, so every model, objective and
the whole distributed pipeline can be trained and evaluated end to end without downloads. The caption
determines the scene up to jitter (position, exact size, shade, rotation, background), so a small CLIP
should learn to match captions to images.

Determinism: sample ``g`` depends only on ``(seed, g)``; its key and shard file depend only on ``g`` and
the shard size. Writing ranges separately (``start_index``) therefore gives exactly the files one run
would write, and disjoint ranges give disjoint held-out sets. Output is byte-identical for the same
arguments with the same numpy/Pillow versions (tar mtimes and owners are fixed).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Well separated in RGB and in hue, and all far from the (grey) background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (145, 55, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Nominal radius (half extent) as a fraction of the image side; the classes are >= 1.48x apart.
SIZES: dict[str, tuple[float, float]] = {"small": (0.085, 0.115), "large": (0.17, 0.22)}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")

MARGIN = 0.02  # min distance of a shape from the border, fraction of the side
GAP = 0.04  # min free space between two shapes along the relation axis, fraction of the side
DOMINANCE = 0.5  # |cross-axis offset| <= DOMINANCE * along-axis offset, so the relation is unambiguous
MAX_ANGLE = 15.0  # degrees of rotation jitter for non-circles (keeps a square a square, not a diamond)
SHADE_JITTER = 12  # +- per channel on a shape's palette colour
MAX_SHARD_SIZE = 10_000  # the key holds the index in the shard in 4 digits
MAX_SHARDS = 100_000  # ... and the shard number in 5
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{0,64}")


class SyntheticConfigError(ValueError):
    """Bad arguments for the generator (a user error: the CLI prints it without a traceback)."""


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; cx, cy, radius in pixels (image spans [0, image_size])."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """objects[0] `relation` objects[1] holds when there are two objects."""

    objects: tuple[SceneObject, ...]
    relation: str | None
    background: tuple[int, int, int]


def caption_for(scene: Scene) -> str:
    """'a {size} {colour} {shape}' [ '{relation} a {size} {colour} {shape}' ]."""
    phrases = [f"a {o.size} {o.colour} {o.shape}" for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    return f"{phrases[0]} {scene.relation} {phrases[1]}"


def _choice(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _attributes(rng: np.random.Generator, image_size: int) -> SceneObject:
    """Colour, shape, size class with jitter (exact radius, rotation, shade); placed later."""
    colour, shape, size = _choice(rng, list(COLOURS)), _choice(rng, SHAPES), _choice(rng, list(SIZES))
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi)) * image_size
    angle = 0.0 if shape == "circle" else float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    shade = rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, size=3)
    r, g, b = (int(c) for c in np.clip(np.array(COLOURS[colour]) + shade, 0, 255))
    return SceneObject(colour, shape, size, cx=0.0, cy=0.0, radius=radius, angle=angle, rgb=(r, g, b))


def _place_pair(rng: np.random.Generator, r_a: float, r_b: float, relation: str, side: int) -> tuple[float, ...]:
    """Centres (ax, ay, bx, by) with `a relation b` true by a clear margin and no overlap.

    Sampled constructively (not by rejection) because two large shapes barely fit side by side.
    u is the coordinate along the relation axis, v across it; 'first' has the smaller u.
    """
    m, gap = MARGIN * side, GAP * side
    a_first = relation in ("to the left of", "above")
    r1, r2 = (r_a, r_b) if a_first else (r_b, r_a)
    lo1, hi1, lo2, hi2 = r1 + m, side - r1 - m, r2 + m, side - r2 - m
    dmin = r1 + r2 + gap
    u1 = float(rng.uniform(lo1, min(hi1, hi2 - dmin)))
    u2 = float(rng.uniform(max(lo2, u1 + dmin), hi2))
    v1 = float(rng.uniform(lo1, hi1))
    span = DOMINANCE * (u2 - u1)
    v_lo, v_hi = max(lo2, v1 - span), min(hi2, v1 + span)
    assert u1 + dmin <= hi2 and v_lo <= v_hi, "size classes too large for the margins"
    v2 = float(rng.uniform(v_lo, v_hi))
    (ua, va), (ub, vb) = ((u1, v1), (u2, v2)) if a_first else ((u2, v2), (u1, v1))
    if relation in ("to the left of", "to the right of"):
        return ua, va, ub, vb
    return va, ua, vb, ub


def sample_scene(rng: np.random.Generator, image_size: int, p_two: float = 0.7) -> Scene:
    """Random attributes and positions; the caption of the result is exact up to jitter."""
    level = int(rng.integers(60, 141))
    r, g, b = (int(c) for c in np.clip(level + rng.integers(-10, 11, size=3), 0, 255))
    background = (r, g, b)
    first = _attributes(rng, image_size)
    if rng.random() >= p_two:
        lo, hi = first.radius + MARGIN * image_size, image_size - first.radius - MARGIN * image_size
        cx, cy = (float(x) for x in rng.uniform(lo, hi, size=2))
        return Scene(objects=(replace(first, cx=cx, cy=cy),), relation=None, background=background)
    second = _attributes(rng, image_size)
    relation = _choice(rng, RELATIONS)
    ax, ay, bx, by = _place_pair(rng, first.radius, second.radius, relation, image_size)
    objects = (replace(first, cx=ax, cy=ay), replace(second, cx=bx, cy=by))
    return Scene(objects=objects, relation=relation, background=background)


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices for a radius-1 shape centred at 0, sized so its axis-aligned extent stays <= ~1."""
    if shape == "square":
        s = 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":  # centroid at 0, apex up (image y grows downwards)
        return [(math.sin(t), -math.cos(t)) for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "cross":
        a, w = 0.95, 0.32
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    raise ValueError(f"no polygon for shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: int) -> None:
    """PIL puts pixel centres at integers; our pixel centres are at +0.5, hence the shift."""
    cx, cy, r = obj.cx * scale - 0.5, obj.cy * scale - 0.5, obj.radius * scale
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.rgb)
        return
    c, s = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    points = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _POLYGONS[obj.shape]]
    draw.polygon(points, fill=obj.rgb)


def draw_scene(scene: Scene, rng: np.random.Generator, image_size: int, supersample: int = 2) -> Image.Image:
    """Flat shapes drawn at `supersample`x (cheap anti-aliasing), then a lighting gradient and pixel noise."""
    big = Image.new("RGB", (image_size * supersample,) * 2, scene.background)
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        _draw_object(draw, obj, supersample)
    img = big.reduce(supersample) if supersample > 1 else big
    pixels = np.asarray(img, dtype=np.float32)
    theta, amplitude, sigma = rng.uniform(0, 2 * math.pi), rng.uniform(0, 10), rng.uniform(1.5, 4.0)
    ramp = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
    gradient = amplitude * (math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None])
    noise = rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    out = np.clip(pixels + gradient[..., None] + noise + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The one source of randomness for sample `index`: nothing else (order, workers) leaks in."""
    return np.random.default_rng([seed, index])


def scene_metadata(scene: Scene, seed: int, index: int, image_size: int) -> dict:
    """JSON-ready description of a scene (coordinates rounded to keep the files readable)."""
    objects = [
        {"colour": o.colour, "shape": o.shape, "size": o.size, "cx": round(o.cx, 3), "cy": round(o.cy, 3),
         "radius": round(o.radius, 3), "angle": round(o.angle, 2), "rgb": list(o.rgb)}
        for o in scene.objects
    ]
    return {
        "caption": caption_for(scene),
        "image_id": f"synthetic-s{seed}-{index:09d}",
        "seed": seed,
        "index": index,
        "width": image_size,
        "height": image_size,
        "objects": objects,
        "relation": scene.relation,
        "background": list(scene.background),
    }


def render_sample(seed: int, index: int, image_size: int = 64, p_two: float = 0.7, jpeg_quality: int = 90) -> tuple[bytes, str, dict]:
    """(jpeg bytes, caption, metadata) for global sample `index`; a pure function of its arguments.

    JPEG is written with 4:4:4 chroma: at 64 px, 4:2:0 would smear the colour of thin shapes.
    """
    rng = sample_rng(seed, index)
    scene = sample_scene(rng, image_size, p_two)
    img = draw_scene(scene, rng, image_size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    meta = scene_metadata(scene, seed, index, image_size)
    return buf.getvalue(), meta["caption"], meta


def sample_key(index: int, shard_size: int, prefix: str = "") -> str:
    """img2dataset-style key: 5-digit shard number + 4-digit position in the shard."""
    return f"{prefix}{index // shard_size:05d}{index % shard_size:04d}"


def shard_name(shard: int, prefix: str = "") -> str:
    return f"{prefix}{shard:05d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed mtime/owner/mode so identical content gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, seed: int, indices: range, shard_size: int, image_size: int,
                prefix: str = "", p_two: float = 0.7, jpeg_quality: int = 90) -> Iterator[int]:
    """Write one tar of samples `indices`, yielding after each sample (for progress bars).

    Written to a temporary name and renamed, so a crash never leaves a truncated shard behind.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for g in indices:
                jpg, caption, meta = render_sample(seed, g, image_size, p_two, jpeg_quality)
                key = sample_key(g, shard_size, prefix)
                meta = {"key": key, **meta}
                _add_member(tar, f"{key}.jpg", jpg)
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                yield 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def validate_args(num_samples: int, shard_size: int, seed: int, image_size: int, start_index: int,
                  prefix: str, p_two: float) -> None:
    """Raise SyntheticConfigError with a fix-it message for any argument the layout cannot hold."""
    checks = [
        (num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"),
        (1 <= shard_size <= MAX_SHARD_SIZE, f"shard_size must be in [1, {MAX_SHARD_SIZE}] (4-digit index in the key), got {shard_size}"),
        (seed >= 0, f"seed must be >= 0, got {seed}"),
        (32 <= image_size <= 4096, f"image_size must be in [32, 4096], got {image_size}"),
        (start_index >= 0, f"start_index must be >= 0, got {start_index}"),
        (start_index % shard_size == 0,
         f"start_index ({start_index}) must be a multiple of shard_size ({shard_size}) so shard files line up "
         f"with those of other ranges; use e.g. {start_index - start_index % shard_size} or "
         f"{start_index - start_index % shard_size + shard_size}"),
        (bool(_PREFIX_RE.fullmatch(prefix)), f"prefix may only hold letters, digits, '_' and '-' (at most 64), got {prefix!r}"),
        (0.0 <= p_two <= 1.0, f"p_two must be in [0, 1], got {p_two}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SyntheticConfigError(message)
    last_shard = (start_index + num_samples - 1) // shard_size
    if last_shard >= MAX_SHARDS:
        raise SyntheticConfigError(f"the last shard number would be {last_shard}; the 5-digit layout holds < {MAX_SHARDS}")


def plan_shards(num_samples: int, shard_size: int, start_index: int = 0) -> list[tuple[int, range]]:
    """(shard number, global indices) for each shard; the last one may be short."""
    end = start_index + num_samples
    return [(s, range(max(s * shard_size, start_index), min((s + 1) * shard_size, end)))
            for s in range(start_index // shard_size, (end - 1) // shard_size + 1)]


def update_sizes_json(out_dir: Path, sizes: dict[str, int]) -> dict[str, int]:
    """Merge `sizes` into out_dir/sizes.json (keeping entries whose shard still exists).

    Merging (under a file lock where available) lets several runs fill one directory with disjoint ranges.
    """
    path = out_dir / "sizes.json"
    dir_fd = os.open(out_dir, os.O_RDONLY)  # lock the directory itself: no lock file left among the shards
    try:
        try:
            import fcntl

            fcntl.flock(dir_fd, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: concurrent runs may race, sequential ones still merge
            pass
        merged: dict[str, int] = {}
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict):
                merged = {k: int(v) for k, v in old.items() if (out_dir / k).is_file()}
        except (OSError, ValueError, TypeError):
            pass
        merged.update(sizes)
        merged = dict(sorted(merged.items()))
        tmp = out_dir / f".sizes.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        os.close(dir_fd)  # also releases the lock
    return merged


def write_shards(out_dir: str | os.PathLike, num_samples: int, shard_size: int, seed: int, image_size: int = 64,
                 start_index: int = 0, prefix: str = "", p_two: float = 0.7, jpeg_quality: int = 90,
                 progress: bool = False) -> dict[str, int]:
    """Write samples [start_index, start_index + num_samples) as img2dataset-layout shards.

    Shard files are numbered globally (sample g lives in shard g // shard_size), so start_index=0
    gives 00000.tar, 00001.tar, ...; returns {shard file name: sample count} for this run, and
    merges it into out_dir/sizes.json.
    """
    validate_args(num_samples, shard_size, seed, image_size, start_index, prefix, p_two)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    from tqdm import tqdm

    with tqdm(total=num_samples, unit="sample", disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
        for shard, indices in plan_shards(num_samples, shard_size, start_index):
            name = shard_name(shard, prefix)
            for n in write_shard(out / name, seed, indices, shard_size, image_size, prefix, p_two, jpeg_quality):
                bar.update(n)
            sizes[name] = len(indices)
    update_sizes_json(out, sizes)
    return sizes


def brace_pattern(out_dir: str | os.PathLike, names: list[str], prefix: str = "") -> str:
    """A WebDataset brace pattern for consecutive shard names, e.g. 'dir/{00000..00004}.tar'."""
    numbers = sorted(int(n[len(prefix):-len(".tar")]) for n in names)
    if len(numbers) == 1:
        return str(Path(out_dir) / shard_name(numbers[0], prefix))
    return str(Path(out_dir) / f"{prefix}{{{numbers[0]:05d}..{numbers[-1]:05d}}}.tar")
