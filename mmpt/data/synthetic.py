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

from mmpt.data.shard_writer import (  # the shard layout, shared with the caption-dataset converters
    MAX_SHARD_SIZE,
    MAX_SHARDS,
    add_tar_member,
    sample_key,
    shard_name,
    update_sizes_json,
)
from mmpt.data.synthetic_styles import DEMO, STYLES, Style

# The demo style's vocabulary (the default; mmpt.data.synthetic_styles defines the others).
COLOURS: dict[str, tuple[int, int, int]] = DEMO.colours
SHAPES: tuple[str, ...] = DEMO.shapes
# Nominal radius (half extent) as a fraction of the image side; the classes are >= 1.48x apart.
SIZES: dict[str, tuple[float, float]] = DEMO.sizes
RELATIONS: tuple[str, ...] = DEMO.relations

MARGIN = 0.02  # min distance of a shape from the border, fraction of the side
GAP = 0.04  # min free space between two shapes along the relation axis, fraction of the side
DOMINANCE = 0.5  # |cross-axis offset| <= DOMINANCE * along-axis offset, so the relation is unambiguous
MAX_ANGLE = 15.0  # degrees of rotation jitter for non-circles (keeps a square a square, not a diamond)
SHADE_JITTER = 12  # +- per channel on a shape's palette colour
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
    """objects[0] `relation` objects[1] holds when there are two objects; words and looks come from `style`."""

    objects: tuple[SceneObject, ...]
    relation: str | None
    background: tuple[int, int, int]
    style: Style = DEMO


def caption_for(scene: Scene) -> str:
    """Demo: 'a {size} {colour} {shape}' [ '{relation} a {size} {colour} {shape}' ]; others: their templates."""
    style = scene.style
    phrases = [style.phrase.format(size=o.size, colour=o.colour, shape=o.shape) for o in scene.objects]
    return style.caption(phrases, scene.relation)


def _choice(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _attributes(rng: np.random.Generator, image_size: int, style: Style = DEMO) -> SceneObject:
    """Colour, shape, size class with jitter (exact radius, rotation, shade); placed later."""
    colour, shape = _choice(rng, list(style.colours)), _choice(rng, style.shapes)
    size = _choice(rng, list(style.sizes))
    lo, hi = style.sizes[size]
    radius = float(rng.uniform(lo, hi)) * image_size
    angle = 0.0 if shape in style.unrotated else float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    shade = rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, size=3)
    r, g, b = (int(c) for c in np.clip(np.array(style.colours[colour]) + shade, 0, 255))
    return SceneObject(colour, shape, size, cx=0.0, cy=0.0, radius=radius, angle=angle, rgb=(r, g, b))


def _place_pair(rng: np.random.Generator, r_a: float, r_b: float, relation: int, side: int) -> tuple[float, ...]:
    """Centres (ax, ay, bx, by) with `a relation b` true by a clear margin and no overlap.

    `relation` indexes Style.relations: 0 left of, 1 right of, 2 above, 3 below.
    Sampled constructively (not by rejection) because two large shapes barely fit side by side.
    u is the coordinate along the relation axis, v across it; 'first' has the smaller u.
    """
    m, gap = MARGIN * side, GAP * side
    a_first = relation in (0, 2)
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
    if relation < 2:
        return ua, va, ub, vb
    return va, ua, vb, ub


def sample_scene(rng: np.random.Generator, image_size: int, p_two: float = 0.7, style: Style = DEMO) -> Scene:
    """Random attributes and positions; the caption of the result is exact up to jitter."""
    level = int(rng.integers(style.background_levels[0], style.background_levels[1] + 1))
    r, g, b = (int(c) for c in np.clip(level + rng.integers(-10, 11, size=3), 0, 255))
    background = (r, g, b)
    first = _attributes(rng, image_size, style)
    if rng.random() >= p_two:
        lo, hi = first.radius + MARGIN * image_size, image_size - first.radius - MARGIN * image_size
        cx, cy = (float(x) for x in rng.uniform(lo, hi, size=2))
        return Scene(objects=(replace(first, cx=cx, cy=cy),), relation=None, background=background, style=style)
    second = _attributes(rng, image_size, style)
    kind = int(rng.integers(len(style.relations)))  # the draw _choice makes: same stream for the demo
    ax, ay, bx, by = _place_pair(rng, first.radius, second.radius, kind, image_size)
    objects = (replace(first, cx=ax, cy=ay), replace(second, cx=bx, cy=by))
    return Scene(objects=objects, relation=style.relations[kind], background=background, style=style)


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
    if shape == "star":  # 5 points, inner radius 0.45: reads as a star, not a pentagon, at 64 px
        radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
        return [(rho * math.sin(k * math.pi / 5), -rho * math.cos(k * math.pi / 5)) for k, rho in enumerate(radii)]
    if shape == "hexagon":
        return [(0.95 * math.cos(k * math.pi / 3), 0.95 * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "diamond":  # a tall rhombus: never mistaken for a (rotated) square
        return [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    raise ValueError(f"no polygon for shape {shape!r}")


_ROUND = ("circle", "ring")  # drawn as ellipses, not polygons
_POLYGONS = {s: _unit_polygon(s) for style in STYLES.values() for s in style.shapes if s not in _ROUND}


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: int) -> None:
    """PIL puts pixel centres at integers; our pixel centres are at +0.5, hence the shift."""
    cx, cy, r = obj.cx * scale - 0.5, obj.cy * scale - 0.5, obj.radius * scale
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.rgb)
        return
    if obj.shape == "ring":  # the hole shows the background: a ring is not a filled circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=obj.rgb, width=max(1, round(0.4 * r)))
        return
    c, s = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    points = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _POLYGONS[obj.shape]]
    draw.polygon(points, fill=obj.rgb)


def _textured_background(base: tuple[int, int, int], rng: np.random.Generator, side: int) -> Image.Image:
    """A two-tone linear gradient from `base` plus faint stripes, so 'background' is not one colour.

    Amplitudes stay small (tone +-30, stripes <= 9) next to the distance of every alt colour from grey.
    """
    other = np.clip(np.array(base) + rng.integers(-30, 31, size=3), 0, 255)
    theta, phi = rng.uniform(0, 2 * math.pi, size=2)
    period, amp, phase = rng.uniform(3.0, 8.0) * side / 64, rng.uniform(3.0, 9.0), rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(side, dtype=np.float32) + 0.5) / side  # (w,)
    xs, ys = ramp[None, :], ramp[:, None]  # (1 w), (h 1)
    t = np.clip(0.5 + (math.cos(theta) * (xs - 0.5) + math.sin(theta) * (ys - 0.5)), 0, 1)  # (h w)
    along = math.cos(phi) * xs + math.sin(phi) * ys  # (h w), the stripes' normal direction
    stripes = amp * np.sin(2 * math.pi * side / period * along + phase)  # (h w)
    bg = (1 - t)[..., None] * np.array(base) + t[..., None] * other + stripes[..., None]  # (h w 3)
    return Image.fromarray(np.clip(bg + 0.5, 0, 255).astype(np.uint8), "RGB")


def draw_scene(scene: Scene, rng: np.random.Generator, image_size: int, supersample: int = 2) -> Image.Image:
    """Shapes drawn at `supersample`x (cheap anti-aliasing) on the style's background, then a lighting
    gradient and pixel noise."""
    side = image_size * supersample
    if scene.style.textured:
        big = _textured_background(scene.background, rng, side)
    else:
        big = Image.new("RGB", (side,) * 2, scene.background)
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
    """JSON-ready description of a scene (coordinates rounded to keep the files readable).

    "style" is written for every style but the demo one, whose files stay byte-identical to older ones.
    """
    objects = [
        {"colour": o.colour, "shape": o.shape, "size": o.size, "cx": round(o.cx, 3), "cy": round(o.cy, 3),
         "radius": round(o.radius, 3), "angle": round(o.angle, 2), "rgb": list(o.rgb)}
        for o in scene.objects
    ]
    demo = scene.style.name == DEMO.name
    extra = {} if demo else {"style": scene.style.name}
    return {
        **extra,
        "caption": caption_for(scene),
        "image_id": f"synthetic-{'' if demo else scene.style.name + '-'}s{seed}-{index:09d}",
        "seed": seed,
        "index": index,
        "width": image_size,
        "height": image_size,
        "objects": objects,
        "relation": scene.relation,
        "background": list(scene.background),
    }


def render_sample(seed: int, index: int, image_size: int = 64, p_two: float = 0.7, jpeg_quality: int = 90,
                  style: str = "demo") -> tuple[bytes, str, dict]:
    """(jpeg bytes, caption, metadata) for global sample `index`; a pure function of its arguments.

    JPEG is written with 4:4:4 chroma: at 64 px, 4:2:0 would smear the colour of thin shapes.
    """
    rng = sample_rng(seed, index)
    scene = sample_scene(rng, image_size, p_two, STYLES[style])
    img = draw_scene(scene, rng, image_size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    meta = scene_metadata(scene, seed, index, image_size)
    return buf.getvalue(), meta["caption"], meta


def write_shard(path: Path, seed: int, indices: range, shard_size: int, image_size: int,
                prefix: str = "", p_two: float = 0.7, jpeg_quality: int = 90,
                style: str = "demo") -> Iterator[int]:
    """Write one tar of samples `indices`, yielding after each sample (for progress bars).

    Written to a temporary name and renamed, so a crash never leaves a truncated shard behind.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for g in indices:
                jpg, caption, meta = render_sample(seed, g, image_size, p_two, jpeg_quality, style)
                key = sample_key(g, shard_size, prefix)
                meta = {"key": key, **meta}
                add_tar_member(tar, f"{key}.jpg", jpg)
                add_tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
                add_tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                yield 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def validate_args(num_samples: int, shard_size: int, seed: int, image_size: int, start_index: int,
                  prefix: str, p_two: float, style: str = "demo") -> None:
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
        (style in STYLES, f"style must be one of {', '.join(STYLES)}, got {style!r}"),
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


def write_shards(out_dir: str | os.PathLike, num_samples: int, shard_size: int, seed: int, image_size: int = 64,
                 start_index: int = 0, prefix: str = "", p_two: float = 0.7, jpeg_quality: int = 90,
                 progress: bool = False, style: str = "demo") -> dict[str, int]:
    """Write samples [start_index, start_index + num_samples) as img2dataset-layout shards.

    Shard files are numbered globally (sample g lives in shard g // shard_size), so start_index=0
    gives 00000.tar, 00001.tar, ...; returns {shard file name: sample count} for this run, and
    merges it into out_dir/sizes.json.
    """
    validate_args(num_samples, shard_size, seed, image_size, start_index, prefix, p_two, style)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    from tqdm import tqdm

    with tqdm(total=num_samples, unit="sample", disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
        for shard, indices in plan_shards(num_samples, shard_size, start_index):
            name = shard_name(shard, prefix)
            steps = write_shard(out / name, seed, indices, shard_size, image_size, prefix, p_two, jpeg_quality, style)
            for n in steps:
                bar.update(n)
            sizes[name] = len(indices)
    update_sizes_json(out, sizes)
    return sizes
