"""Several weighted data sources (image-text pairs, image-only shards, text-only shards or .txt files)
mixed into one `MixedBatch` per micro-batch.

Why fixed counts: each source contributes the same number of samples to every micro-batch on every rank
(its share of the batch by weight, largest-remainder rounding), so a model's collectives (feature
all-gathers, ITC over the global batch) see equal shapes on all ranks, and no step is image-only by chance.
Each source keeps its own resampled, shuffled stream (`SampleSource`, split=True) seeded by
(seed, rank, worker, source index), resumed exactly from its own cursor (mmpt.data.stream_state): tar shards
are divided among the (rank, worker) slots when there are at least as many shards as slots, and .txt lines
always are, so in that case no two ranks ever read the same sample. With fewer shards than slots every slot
draws from all shards (told apart by seed).
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mmpt.data.batch import KINDS
from mmpt.data.limits import SampleLimits
from mmpt.data.masking import BlockMasker
from mmpt.data.pipeline import (BatchLoader, SampleSource, SkipCounter, collate, is_text_file, make_loader,
                                 resume_state, stream_start)
from mmpt.data.shards import ShardSpec, check_local_shards, expand_urls
from mmpt.data.stall import DEFAULT_MAX_EMPTY_S
from mmpt.data.stream_state import LoaderState, stamp
from mmpt.data.tokenizer import TextTokenizer
from mmpt.data.transforms import CLIP_MEAN, CLIP_STD, TrainTransform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """One data source as configured: `data.sources[i]`."""

    name: str
    kind: str
    urls: ShardSpec
    weight: float = 1.0


def source_counts(weights: Sequence[float], batch_size: int) -> list[int]:
    """Samples per micro-batch for each source: `batch_size * w / sum(w)`, largest-remainder rounded.

    Exact arithmetic (Fractions), ties go to the earlier source, so every rank computes the same counts.
    """
    if batch_size < 1 or not weights or min(weights) <= 0:
        raise ValueError(f"need batch_size >= 1 and positive weights, got {batch_size} and {list(weights)}")
    exact = [Fraction(w) for w in weights]
    quotas = [batch_size * w / sum(exact) for w in exact]
    counts = [int(q) for q in quotas]  # floor: quotas are positive
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


def describe(spec: SourceSpec, index: int) -> str:
    return f"data.sources[{index}]" + (f" ({spec.name!r})" if spec.name else "")


def check_sources(specs: Sequence[SourceSpec], batch_size: int) -> list[int]:
    """Per-source counts, or ValueError naming the source, the problem and the fix. Checks local files too."""
    if not specs:
        raise ValueError("no data sources given")
    names = [s.name for s in specs if s.name]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"data.sources names must be unique; {twice} appear more than once")
    for i, spec in enumerate(specs):
        where = describe(spec, i)
        if spec.kind not in KINDS:
            raise ValueError(f"{where}.kind={spec.kind!r} is not a data kind; choose one of {', '.join(KINDS)}")
        if not spec.weight > 0:
            raise ValueError(f"{where}.weight={spec.weight} must be > 0; remove the source to stop using it")
        text_files = [u for u in expand_urls(spec.urls) if is_text_file(u)]
        if text_files and spec.kind != "texts":
            raise ValueError(f"{where}: plain text files ({text_files[0]!r}) hold texts only; "
                             f"use kind=texts for them, or tar shards for kind={spec.kind}")
        try:
            check_local_shards(spec.urls)
        except FileNotFoundError as exc:
            raise ValueError(f"{where}.urls: {exc}") from None
    counts = source_counts([s.weight for s in specs], batch_size)
    for i, (spec, count) in enumerate(zip(specs, counts)):
        if count == 0:
            share = Fraction(spec.weight) / sum(Fraction(s.weight) for s in specs)
            raise ValueError(
                f"{describe(spec, i)} gets 0 of the {batch_size} samples per micro-batch (weight {spec.weight}, "
                f"share {float(share):.3f}); raise its weight or data.batch_size (>= {math.ceil(1 / share)} "
                "gives it one)"
            )
    return counts


class MixedStream(IterableDataset):
    """Per-worker generator of `{"parts": {kind: batch dict}}`: `counts[i]` samples of source i each time,
    sources of one kind concatenated in config order."""

    def __init__(self, sources: list[SampleSource], names: list[str], counts: list[int], tokenizer: TextTokenizer,
                 *, seed: int, rank: int, world_size: int, resume: LoaderState | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.sources, self.names, self.counts, self.tokenizer = sources, names, counts, tokenizer
        self.seed, self.rank, self.world_size, self.resume = seed, rank, world_size, resume
        self.epoch = -1  # bumped per __iter__, so re-iterating a loader does not replay the stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.epoch += 1
        worker, reseed, start = stream_start(self.resume, physical, num_workers, self.epoch)
        streams, cursors = [], []
        for i, (source, name, count) in enumerate(zip(self.sources, self.names, self.counts)):
            counter = SkipCounter(self.rank, worker, source=name)
            seeds = (self.seed, self.rank, worker, reseed, self.epoch, i)
            cursors.append(start(i))
            good = source.train_samples(counter, seeds, self.rank, self.world_size, worker, num_workers, cursors[-1])
            streams.append((source.kind, count, counter, good))
        while True:
            items: dict[str, list] = {}
            skipped: dict[str, dict[str, int]] = {}
            for kind, count, counter, good in streams:
                items.setdefault(kind, []).extend(itertools.islice(good, count))  # train streams never end
                merged = skipped.setdefault(kind, {})
                for reason, n in counter.pop().items():
                    merged[reason] = merged.get(reason, 0) + n
            parts = {kind: collate(items[kind], kind, self.tokenizer, skipped[kind]) for kind in items}
            yield {"parts": parts, "stream": stamp(worker, cursors)}


def build_mixed_train_loader(
    specs: Sequence[SourceSpec],
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    image_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    shuffle_buffer: int = 1000,
    resume: LoaderState | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    image_mask: BlockMasker | None = None,
    pin_memory: bool | None = None,
    limits: SampleLimits = SampleLimits(),
    max_empty_s: float = DEFAULT_MAX_EMPTY_S,
) -> BatchLoader:
    """Infinite stream of `MixedBatch`: parts keyed by kind, `len(batch) == batch_size`, per-kind sizes fixed
    by `source_counts`; image parts carry `image_mask` (`b n` bool) when `image_mask` is given."""
    counts = check_sources(specs, batch_size)
    transform = TrainTransform(image_size, scale=scale, ratio=ratio, hflip=hflip, mean=mean, std=std)
    slots = world_size * max(num_workers, 1)
    sources = []
    for i, spec in enumerate(specs):
        urls = expand_urls(spec.urls)
        tars = [u for u in urls if not is_text_file(u)]
        if 0 < len(tars) < slots:
            log.warning("%s has %d shard(s) for %d rank x worker slots: every slot draws from all of them, so "
                        "ranks may read the same samples; write at least %d shards to split them",
                        describe(spec, i), len(tars), slots, slots)
        sources.append(SampleSource(urls, spec.kind, None if spec.kind == "texts" else transform,
                                    None if spec.kind == "texts" else image_mask, shuffle_buffer, split=True,
                                    limits=limits, max_empty_s=max_empty_s))
    state = resume_state(resume, world_size, num_workers)
    dataset = MixedStream(sources, [s.name or f"#{i}" for i, s in enumerate(specs)], counts, tokenizer,
                          seed=seed, rank=rank, world_size=world_size,
                          resume=resume_state(resume, world_size, num_workers))
    log.info("mixed data: %s samples per micro-batch",
             ", ".join(f"{s.name or '#' + str(i)} ({s.kind}) {c}" for i, (s, c) in enumerate(zip(specs, counts))))
    return make_loader(dataset, num_workers, pin_memory, max_empty_s, state)
