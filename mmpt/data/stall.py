"""A training stream that stops producing samples ends the run with one clear message instead of hanging.

Two checks inside each (rank, worker) stream (`StreamGuard`), one in the main process:
- every distinct shard of the stream's pool was opened since the last sample and none gave one (all deleted,
  all unreadable, all empty): fails at once, without waiting for the clock;
- no usable sample for `data.max_empty_s` seconds of the stream's own running time (time spent suspended
  while the trainer steps or evaluates is not counted): shards that fail slowly, samples that are all skipped;
- the main process waits at most `data.max_empty_s` for a batch from DataLoader workers (its `timeout`), which
  also covers a worker blocked for ever in one read (a hung `pipe:` command, a stalled remote store).
  With `data.num_workers=0` nothing can interrupt such a read: the first two checks still hold.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

DEFAULT_MAX_EMPTY_S = 300.0  # data.max_empty_s: generous next to any sane shard read, short next to a lost job

class DataStreamError(RuntimeError):
    """The data stream cannot produce samples; the CLI prints it as one `error:` line (exit 2)."""


class StreamGuard:
    """Watches one (rank, worker) train stream: which shards came back empty, and time since the last sample."""

    def __init__(self, urls: Sequence[str], max_empty_s: float, where: str, clock=time.monotonic):
        self.distinct = len(set(urls))
        self.max_empty_s, self.where, self.clock = max_empty_s, where, clock
        self.empty: set[str] = set()  # shards opened since the last raw sample (all of them gave nothing)
        self.last_good = clock()

    def shard_opening(self, url: str) -> None:
        """Called before each shard is read: fails when every shard already came back empty in a row."""
        if self.distinct and len(self.empty) >= self.distinct:
            raise DataStreamError(
                f"{self.where}: all {self.distinct} shard(s) gave no samples in a row (deleted, unreadable or "
                f"empty tars; last tried: {url!r}); check that the shards exist and are readable "
                "(`tar tf SHARD`), then resume with the same command")
        self.empty.add(url)
        self.check_clock()

    def raw_sample(self) -> None:
        """A shard gave a sample (usable or not): the shards are readable."""
        if self.empty:
            self.empty.clear()

    def good_sample(self) -> None:
        """Called when the stream resumes after handing out a usable sample: the clock restarts."""
        self.last_good = self.clock()

    def check_clock(self) -> None:
        waited = self.clock() - self.last_good
        if waited > self.max_empty_s:
            raise DataStreamError(
                f"{self.where}: no usable sample for {waited:.0f} s (data.max_empty_s={self.max_empty_s:g}); "
                "shards failing slowly, or every sample skipped (see the skip warnings above); fix the data "
                "or raise data.max_empty_s")


def loader_error(exn: BaseException, timeout_s: float, where: str) -> DataStreamError | None:
    """The one-line error for a DataLoader failure that means "no data", else None (re-raise as it is).

    A worker's DataStreamError arrives re-raised by PyTorch with the worker's traceback in its text: keep the
    original message only. PyTorch's own timeout arrives as a RuntimeError "DataLoader timed out after N s".
    """
    text = str(exn)
    if isinstance(exn, DataStreamError):
        marker = f"{DataStreamError.__name__}: "
        if "Original Traceback" in text and marker in text:
            text = text.rsplit(marker, 1)[1].strip()
        return DataStreamError(text)
    if timeout_s and isinstance(exn, RuntimeError) and text.startswith("DataLoader timed out"):
        return DataStreamError(
            f"{where}: no batch from the data-loader workers for {timeout_s:g} s (data.max_empty_s); a worker is "
            "stuck reading a shard (a hung pipe: command or remote store?) or the shards stopped giving usable "
            "samples; fix the data source or raise data.max_empty_s")
    return None
