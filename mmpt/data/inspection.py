"""Looking at shards before training on them: the samples the loaders would keep, why others are dropped,
caption and image size distributions, and a contact sheet of images with their captions.

A sample is judged by the loaders' own `_prepare` (mmpt.data.pipeline), so "corrupt" here means exactly what
training would skip, counted under the same reasons (bad_image, missing_caption, bad_json, bad_tar, ...).
"""
from __future__ import annotations

import random
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mmpt.data.pipeline import SkipCounter, _prepare, _raw_samples
from mmpt.data.transforms import CLIP_MEAN, CLIP_STD

PERCENTILES = (0, 5, 50, 95, 100)


class _ImageSize:
    """A 'transform' for `_prepare` that keeps the decoded image's (width, height): decoding still fails on
    corrupt bytes, as in training, but nothing is resized."""

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[int, int]:
        return img.size


class _KeepImage:
    """A 'transform' for `_prepare` that keeps the decoded PIL image as it is."""

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        return img


@dataclass
class Scan:
    """What a pass over shards saw. `skipped`: reason -> count; `examples`: reason -> the first sample's detail."""

    shards: int
    samples: int = 0  # usable ones
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


def scan(paths: Sequence[str], transform: Callable, kind: str = "pairs", seed: int = 0,
         on_sample: Callable[[], None] | None = None) -> tuple[Scan, Iterator[Any]]:
    """(the running tally, an iterator of the usable samples (`_Good`, image = transform's output)), in
    shard order. The tally is complete once the iterator is exhausted; `on_sample` runs for every sample read."""
    result = Scan(shards=len(paths))
    counter = _Tally(result)
    rng = random.Random(seed)

    def samples() -> Iterator[Any]:
        for raw in _raw_samples(paths, counter, None):
            if on_sample is not None:
                on_sample()
            good = _prepare(raw, kind, transform, None, rng)
            if isinstance(good, tuple):
                _skip(result, *good)
                continue
            result.samples += 1
            yield good

    return result, samples()


class _Tally(SkipCounter):
    """The loaders' skip counter (it also counts unreadable tar data as bad_tar), tallying into a Scan
    instead of warning."""

    def __init__(self, result: Scan):
        super().__init__(rank=0, worker=0)
        self.result = result

    def add(self, reason: str, detail: str) -> None:
        _skip(self.result, reason, detail)


def _skip(result: Scan, reason: str, detail: str) -> None:
    result.skipped[reason] += 1
    result.examples.setdefault(reason, " ".join(detail.split()))


@dataclass
class Stats:
    scan: Scan
    caption_lengths: list[int]  # tokens (or words without a tokenizer), one per usable sample with a caption
    widths: list[int]
    heights: list[int]


def collect_stats(paths: Sequence[str], count_tokens: Callable[[str], int], kind: str = "pairs",
                  on_sample: Callable[[], None] | None = None) -> Stats:
    """One pass over the shards: every sample decoded (as training would), sizes and caption lengths kept."""
    result, samples = scan(paths, _ImageSize(), kind, on_sample=on_sample)
    lengths, widths, heights = [], [], []
    for good in samples:
        if good.caption is not None:
            lengths.append(count_tokens(good.caption))
        if good.image is not None:
            widths.append(good.image[0])
            heights.append(good.image[1])
    return Stats(result, lengths, widths, heights)


def percentile_line(values: Sequence[int]) -> str:
    """'min 3 | p5 4 | p50 9 | p95 14 | max 16' (nearest-rank percentiles: each is a value that occurs)."""
    if not values:
        return "-"
    got = np.percentile(np.asarray(values), PERCENTILES, method="inverted_cdf")  # nearest rank: sorted[ceil(p% * n) - 1]
    names = {0: "min", 100: "max"}
    return " | ".join(f"{names.get(p, f'p{p}')} {int(v)}" for p, v in zip(PERCENTILES, got))


def format_stats(stats: Stats, length_unit: str, max_len: int | None = None) -> str:
    """The report `mmpt-data stats` prints."""
    s = stats.scan
    read = s.samples + sum(n for r, n in s.skipped.items() if r != "bad_tar")
    lines = [f"shards: {s.shards}", f"samples: {read} read, {s.samples} usable, {read - s.samples} skipped"]
    if s.skipped["bad_tar"]:
        lines[-1] += f"; {s.skipped['bad_tar']} shard(s) with unreadable tar data (read up to the damage)"
    if s.skipped:
        lines.append("skipped by reason (what training would skip):")
        lines += [f"  {reason}: {n}  e.g. {s.examples[reason][:200]}" for reason, n in s.skipped.most_common()]
    lines.append(f"caption length ({length_unit}): {percentile_line(stats.caption_lengths)}")
    if max_len is not None and stats.caption_lengths:
        cut = sum(n > max_len for n in stats.caption_lengths)
        lines.append(f"  longer than {max_len} (truncated at data.max_text_len={max_len}): {cut} "
                     f"({100 * cut / len(stats.caption_lengths):.1f}%)")
    lines.append(f"image width (px): {percentile_line(stats.widths)}")
    lines.append(f"image height (px): {percentile_line(stats.heights)}")
    return "\n".join(lines)


# ---- the contact sheet -------------------------------------------------------------------------------------

def to_display(image: Image.Image | torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> Image.Image:
    """A PIL image as is, or a transform's normalised `c h w` tensor back to RGB pixels."""
    if isinstance(image, Image.Image):
        return image
    pixels = image.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # c h w -> h w c
    return Image.fromarray(array, "RGB")


@dataclass(frozen=True)
class SheetLayout:
    """Tiles of `tile` x `tile` pixels for the image, `caption_lines` lines of text under each."""

    cols: int
    rows: int
    tile: int = 160
    caption_lines: int = 4
    line_height: int = 12
    pad: int = 4

    @property
    def cell(self) -> tuple[int, int]:
        return self.tile + 2 * self.pad, self.tile + self.caption_lines * self.line_height + 3 * self.pad

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.cell
        return self.cols * w, self.rows * h


def contact_sheet(items: Sequence[tuple[Image.Image, str]], layout: SheetLayout) -> Image.Image:
    """Images fitted (aspect kept) into tiles on a white sheet, each with its caption wrapped below it."""
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    cell_w, cell_h = layout.cell
    chars = max(8, layout.tile // 6)  # the default bitmap font is ~6 px per character
    for i, (image, caption) in enumerate(items):
        x0, y0 = (i % layout.cols) * cell_w + layout.pad, (i // layout.cols) * cell_h + layout.pad
        scale = layout.tile / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        # nearest for upscaling: a 32-px training crop stays visibly pixelated, as the model sees it
        fitted = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
        sheet.paste(fitted, (x0 + (layout.tile - size[0]) // 2, y0 + (layout.tile - size[1]) // 2))
        lines = textwrap.wrap(caption, chars)
        if len(lines) > layout.caption_lines:
            lines = lines[: layout.caption_lines]
            lines[-1] = lines[-1][: chars - 3] + "..."
        for j, line in enumerate(lines):
            draw.text((x0, y0 + layout.tile + layout.pad + j * layout.line_height), line, fill="black", font=font)
    return sheet


def sheet_items(paths: Sequence[str], count: int, transform: Callable | None, kind: str = "pairs", seed: int = 0,
                on_sample: Callable[[], None] | None = None) -> tuple[list[tuple[Image.Image, str]], Scan]:
    """The first `count` usable samples as (display image, caption); `transform` None shows decoded images."""
    result, samples = scan(paths, transform or _KeepImage(), kind, seed, on_sample)
    items = []
    for good in samples:
        if good.image is None:
            continue
        items.append((to_display(good.image), good.caption or ""))
        if len(items) == count:
            break
    return items, result

