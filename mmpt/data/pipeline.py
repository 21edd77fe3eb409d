"""WebDataset loaders that yield `Batch`: an infinite resampled train stream and an exact-once eval pass.

Tar reading uses webdataset's low-level iterators; shard choice, shuffling, decoding, skipping and
batching are done here so that seeding, skip accounting and rank/worker splitting are explicit.
Workers yield plain dicts (so DataLoader can pin them); the main process wraps them into `Batch`.
Nothing here imports a model.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from mmpt.data.batch import Batch
from mmpt.data.shards import ShardSpec, check_local_shards, expand_urls, split_shards
from mmpt.data.tokenizer import TextTokenizer
from mmpt.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ImageTransform = Callable[[Any, random.Random], torch.Tensor]

# a train stream that opens this many shards in a row without a single sample, or skips this many
# samples in a row, is broken: fail loudly instead of resampling forever with no batch
MAX_EMPTY_SHARDS_IN_A_ROW = 200
MAX_SKIPS_IN_A_ROW = 10_000


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integer parts; nearby tuples give unrelated streams (unlike seed + rank)."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1, np.uint64)
    return int(state[0])


class SkipCounter:
    """Counts dropped samples by reason for one worker; warns once per reason, tagged with rank/worker."""

    def __init__(self, rank: int, worker: int):
        self.rank, self.worker = rank, worker
        self.pending: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.shard_index = 0  # which shard this worker is reading (bumped by `track_shards`)
        self._bad_shard = -1

    def track_shards(self, urls: Iterable[str]) -> Iterator[dict[str, str]]:
        """Shard URLs -> webdataset source dicts, remembering which shard is being read."""
        for url in urls:
            self.shard_index += 1
            yield {"url": url}

    def add(self, reason: str, detail: str) -> None:
        if reason not in self.total:
            log.warning(
                "data rank %d worker %d: skipping %s (%s); later '%s' skips are only counted in Batch.skipped",
                self.rank, self.worker, detail, reason, reason,
            )
        self.pending[reason] += 1
        self.total[reason] += 1

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler: like `warn_and_continue`, but counted and without its 0.5 s sleep.

        Counted once per shard read: a truncated tar raises several times as the reader gives up.
        """
        if self._bad_shard != self.shard_index:
            self._bad_shard = self.shard_index
            self.add("bad_tar", f"unreadable tar data: {exn!r}"[:500])
        return True

    def pop(self) -> dict[str, int]:
        """Counts since the previous pop (i.e. since this worker's previous batch)."""
        out, self.pending = dict(self.pending), Counter()
        return out


@dataclass
class _Good:
    key: str
    image_id: str
    caption: str
    image: torch.Tensor  # c h w


def _prepare(raw: dict[str, Any], transform: ImageTransform, rng: random.Random) -> _Good | tuple[str, str]:
    """Raw tar sample -> decoded sample, or (reason, detail) for why it must be skipped."""
    key = raw.get("__key__", "?")
    where = f"sample {key!r} in {raw.get('__url__', '?')}"
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        return "missing_image", f"{where}: no {'/'.join(IMAGE_EXTS)} entry"
    if raw.get("txt") is None:
        return "missing_caption", f"{where}: no txt entry"
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        return "bad_caption", f"{where}: {exn}"
    if not caption:
        return "missing_caption", f"{where}: empty caption"
    image_id = key
    if raw.get("json") is not None:
        try:
            meta = json.loads(raw["json"])
        except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError
            return "bad_json", f"{where}: {exn}"
        if isinstance(meta, dict) and meta.get("image_id") is not None:
            image_id = str(meta["image_id"])
    try:
        image = transform(decode_image(raw[ext]), rng)
    except Exception as exn:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ...: all mean "bad image"
        return "bad_image", f"{where}: {type(exn).__name__}: {exn}"
    return _Good(key=key, image_id=image_id, caption=caption, image=image)


def _shuffled(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: keep `bufsize` items, emit a random one per arrival (raw bytes, pre-decode)."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class _ShardStream(IterableDataset):
    """Per-worker generator of collated batch dicts; see `build_train_loader` / `build_eval_loader`."""

    def __init__(
        self,
        urls: list[str],
        tokenizer: TextTokenizer,
        transform: ImageTransform,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        resume_step: int,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.urls, self.tokenizer, self.transform = urls, tokenizer, transform
        self.batch_size, self.train = batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.resume_step = shuffle_buffer, resume_step
        self.epoch = -1  # bumped per __iter__, so re-iterating a loader does not replay the stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.epoch += 1
        counter = SkipCounter(self.rank, worker)
        if self.train:
            rngs = [
                random.Random(derive_seed(self.seed, self.rank, worker, self.resume_step, self.epoch, purpose))
                for purpose in range(3)
            ]  # independent streams for shard choice, shuffle and augmentation
            state = {"empty_shards": 0}
            shards = counter.track_shards(self._resampled(rngs[0], state))
            samples = tarfile_samples(shards, handler=counter.tar_handler)
            raw: Iterable[dict[str, Any]] = self._mark_nonempty(samples, state)
            if self.shuffle_buffer > 1:
                raw = _shuffled(raw, self.shuffle_buffer, rngs[1])
            aug_rng = rngs[2]
        else:
            mine = split_shards(self.urls, self.rank, self.world_size, worker, num_workers)
            if not mine:
                return
            raw = tarfile_samples(counter.track_shards(mine), handler=counter.tar_handler)
            aug_rng = random.Random(0)  # unused by the eval transform
        good = self._decode(raw, counter, aug_rng)
        yield from self._batches(good, counter)

    def _resampled(self, rng: random.Random, state: dict[str, int]) -> Iterator[str]:
        """Shards drawn with replacement, forever; errors out if shards keep coming back empty."""
        while True:
            if state["empty_shards"] >= MAX_EMPTY_SHARDS_IN_A_ROW:
                raise RuntimeError(
                    f"rank {self.rank}: {MAX_EMPTY_SHARDS_IN_A_ROW} shards in a row gave no samples "
                    f"(unreadable or empty tars?); first shard: {self.urls[0]!r}"
                )
            state["empty_shards"] += 1
            yield self.urls[rng.randrange(len(self.urls))]

    @staticmethod
    def _mark_nonempty(raw: Iterable[dict[str, Any]], state: dict[str, int]) -> Iterator[dict[str, Any]]:
        for sample in raw:
            state["empty_shards"] = 0
            yield sample

    def _decode(self, raw: Iterable[dict[str, Any]], counter: SkipCounter, aug_rng: random.Random) -> Iterator[_Good]:
        skips_in_a_row = 0
        for sample in raw:
            # one fresh generator per sample: augmentation does not depend on what other samples consumed
            result = _prepare(sample, self.transform, random.Random(aug_rng.getrandbits(64)))
            if isinstance(result, _Good):
                skips_in_a_row = 0
                yield result
                continue
            counter.add(*result)
            skips_in_a_row += 1
            if self.train and skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
                raise RuntimeError(
                    f"rank {self.rank}: {MAX_SKIPS_IN_A_ROW} samples in a row were skipped ({counter.total}); "
                    "the shards do not hold usable image-text pairs"
                )

    def _batches(self, good: Iterable[_Good], counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Full batches (train) or full + one smaller last batch (eval).

        A full batch is emitted only when the next good sample arrives (or the stream ends), so skips
        that happen after its last sample still travel with it instead of being lost at the end.
        """
        buf: list[_Good] = []
        for item in good:
            if len(buf) == self.batch_size:
                yield self._collate(buf, counter.pop())
                buf = []
            buf.append(item)
        if buf and (not self.train or len(buf) == self.batch_size):
            yield self._collate(buf, counter.pop())
        leftover = counter.pop()
        if leftover:
            log.warning("data rank %d worker %d: %s skipped after the last batch (not in any Batch.skipped)",
                        counter.rank, counter.worker, leftover)

    def _collate(self, items: list[_Good], skipped: dict[str, int]) -> dict[str, Any]:
        captions = [it.caption for it in items]
        input_ids, attention_mask = self.tokenizer(captions)
        return {
            "images": torch.stack([it.image for it in items]),  # b c h w
            "input_ids": input_ids,  # b l
            "attention_mask": attention_mask,  # b l
            "keys": [it.key for it in items],
            "image_ids": [it.image_id for it in items],
            "captions": captions,
            "skipped": skipped,
        }


class BatchLoader:
    """Iterable of `Batch` over a DataLoader of batch dicts; `.skipped_total` sums `Batch.skipped` seen."""

    def __init__(self, dataloader: DataLoader):
        self.dataloader = dataloader
        self.skipped_total: Counter[str] = Counter()

    def __iter__(self) -> Iterator[Batch]:
        for item in self.dataloader:
            self.skipped_total.update(item["skipped"])
            yield Batch(**item)


def _worker_init(_: int) -> None:
    # each worker tokenizes its own batches; rayon threads per worker would only oversubscribe the CPUs
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _make_loader(dataset: _ShardStream, num_workers: int, pin_memory: bool | None) -> BatchLoader:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are built inside the workers
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    return BatchLoader(loader)


def build_train_loader(
    urls: ShardSpec,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    image_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    shuffle_buffer: int = 1000,
    resume_step: int = 0,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    pin_memory: bool | None = None,
) -> BatchLoader:
    """Infinite stream of `Batch` (images `b c h w`, ids/mask `b l`), each exactly `batch_size`.

    Every (rank, worker) samples shards with replacement from its own RNG seeded by
    (seed, rank, worker, resume_step), so ranks see different data and a resumed run draws fresh
    samples rather than replaying the start. Same arguments -> same batches.
    """
    expanded = expand_urls(urls)
    check_local_shards(urls)
    transform = TrainTransform(image_size, scale=scale, ratio=ratio, hflip=hflip, mean=mean, std=std)
    dataset = _ShardStream(
        expanded, tokenizer, transform, batch_size=batch_size, train=True, seed=seed, rank=rank,
        world_size=world_size, shuffle_buffer=shuffle_buffer, resume_step=resume_step,
    )
    return _make_loader(dataset, num_workers, pin_memory)


def build_eval_loader(
    urls: ShardSpec,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    image_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    pin_memory: bool | None = None,
) -> BatchLoader:
    """One ordered pass: shards split by rank, then by worker, so each good sample appears exactly once
    across all ranks and workers. The last batch of a worker may be smaller; a (rank, worker) without
    shards yields nothing. Each pass over the returned loader re-reads the shards.
    """
    expanded = expand_urls(urls)
    check_local_shards(urls)
    transform = EvalTransform(image_size, mean=mean, std=std)
    dataset = _ShardStream(
        expanded, tokenizer, transform, batch_size=batch_size, train=False, seed=0, rank=rank,
        world_size=world_size, shuffle_buffer=0, resume_step=0,
    )
    return _make_loader(dataset, num_workers, pin_memory)
