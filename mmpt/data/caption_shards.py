"""Images with captions (mmpt.data.caption_sources) -> WebDataset shards in one of two layouts.

eval:  one sample per image: `.jpg`, `.txt` = the first caption, `.json` = {"image_id", "captions": [all]}
       (what the standard retrieval protocol needs: unique images, every caption of each).
train: one sample per (image, caption) pair: `.jpg`, `.txt` = the caption, `.json` = {"image_id"}.
Images are checked by decoding them with the pipeline's own decoder, so whatever is written the loaders
read; JPEG bytes are kept as they are (no second lossy pass), other formats become JPEG (as do images
downscaled on request). Keys are
img2dataset-style running numbers: unique, and stable for the same input and options.
"""
from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmpt.data.caption_sources import CaptionedImage, CaptionSource
from mmpt.data.shard_writer import MAX_SHARD_SIZE, RollingShardWriter, update_sizes_json

LAYOUTS = ("eval", "train")
REPORT_NAME = "report.json"
JPEG_QUALITY = 95  # re-encoding of non-JPEG images: high, since training augments and downsizes later
_SHARD_FILE = re.compile(r"\d{5}\.tar")


def default_layout(split: str | None) -> str:
    """eval for the splits one evaluates on, train for everything else."""
    return "eval" if split in ("val", "test") else "train"


def image_for_shard(path: str, shorter_side: int | None = None) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None) for a usable image, else (None, reason): missing_file, unreadable_file, bad_image.

    `shorter_side`: downscale (bicubic, aspect kept) images whose shorter side is longer, and re-encode them;
    the loaders' transforms resize to data.image_size anyway, so this only saves disk and decode time.
    A top-level function, so a process pool can run it.
    """
    from PIL import Image

    from mmpt.data.transforms import decode_image

    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, "missing_file"
    except OSError:
        return None, "unreadable_file"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
        image = decode_image(data)  # full decode: truncated or corrupt files fail here, not in training
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... for bad bytes
        return None, "bad_image"
    short = min(image.size)
    if shorter_side is not None and short > shorter_side:
        scale = shorter_side / short
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    elif fmt == "JPEG":
        return data, None
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), None


def samples_of(image: CaptionedImage, jpg: bytes, layout: str) -> Iterator[dict[str, bytes]]:
    """The shard samples (members by extension) of one image in `layout`."""
    if layout == "eval":
        meta = {"image_id": image.image_id, "captions": list(image.captions)}
        yield {"jpg": jpg, "txt": image.captions[0].encode("utf-8"), "json": _json_bytes(meta)}
    else:
        meta_bytes = _json_bytes({"image_id": image.image_id})
        for caption in image.captions:
            yield {"jpg": jpg, "txt": caption.encode("utf-8"), "json": meta_bytes}


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Create `out_dir`; refuse one that already holds shards (a shorter rerun would leave stale ones behind
    and sizes.json would list them) unless `overwrite`, which deletes those shards and the old sizes/report."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create --out {out}: {exc}") from exc
    old = sorted(p for p in out.iterdir() if _SHARD_FILE.fullmatch(p.name))
    if old and not overwrite:
        raise FileExistsError(f"--out {out} already holds {len(old)} shard(s) ({old[0].name}, ...); "
                              "choose an empty directory or pass --overwrite to replace them")
    for path in [*old, out / "sizes.json", out / REPORT_NAME]:
        path.unlink(missing_ok=True)
    return out


@dataclass
class WriteResult:
    sizes: dict[str, int]  # shard file name -> samples
    images: int = 0  # images written
    captions: int = 0  # captions written (in .txt for train, in .json for eval)
    skipped_images: Counter[str] = field(default_factory=Counter)
    skipped_captions: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(self.sizes.values())


def write_caption_shards(source: CaptionSource, out: Path, layout: str, shard_size: int, workers: int = 1,
                         shorter_side: int | None = None, progress: bool = True) -> WriteResult:
    """Check and encode every image (in `workers` processes, order kept) and write the samples of the usable
    ones into `out`; images that fail are skipped and counted with their captions. Writes sizes.json."""
    from tqdm import tqdm

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"--shard-size must be in [1, {MAX_SHARD_SIZE}], got {shard_size}")
    result = WriteResult({}, skipped_images=Counter(source.skipped_images),
                         skipped_captions=Counter(source.skipped_captions), examples=dict(source.examples))
    paths = [str(image.path) for image in source.images]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(paths) > 1 else None
    try:
        encode = functools.partial(image_for_shard, shorter_side=shorter_side)
        encoded = pool.imap(encode, paths, chunksize=8) if pool else map(encode, paths)
        with RollingShardWriter(out, shard_size) as writer, \
                tqdm(total=len(paths), unit="img", desc=f"writing {layout} shards", disable=not progress,
                     dynamic_ncols=True, mininterval=0.5) as bar:
            for image, (jpg, reason) in zip(source.images, encoded):
                bar.update(1)
                if jpg is None:
                    assert reason is not None
                    result.skipped_images[reason] += 1
                    result.skipped_captions[reason] += len(image.captions)
                    result.examples.setdefault(reason, f"image {image.image_id}: {image.path}")
                    continue
                for sample in samples_of(image, jpg, layout):
                    writer.write(sample)
                result.images += 1
                result.captions += len(image.captions)
        result.sizes = dict(writer.sizes)
    finally:
        if pool is not None:
            pool.terminate()
    if result.sizes:
        update_sizes_json(out, result.sizes)
    return result


def write_report(out: Path, result: WriteResult, **context: object) -> Path:
    """out/report.json: what was written and what was skipped, by reason, with a first example of each."""
    report = {
        **context,
        "samples": result.samples, "images": result.images, "captions": result.captions,
        "shards": result.sizes,
        "skipped_images": dict(sorted(result.skipped_images.items())),
        "skipped_captions": dict(sorted(result.skipped_captions.items())),
        "examples": dict(sorted(result.examples.items())),
    }  # fmt: skip
    path = out / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path
