"""Writing WebDataset tar shards: the layout every mmpt writer shares.

Layout: `{prefix}00000.tar`, `{prefix}00001.tar`, ... holding img2dataset-style keys (5-digit shard number +
4-digit position), members with fixed mtime/owner (identical content gives identical bytes), shards written
under a temporary name and renamed when complete, and `sizes.json` = {shard file name: sample count}.
Why one place: the synthetic generator and the caption-dataset converters must write the same layout so
every loader and tool reads both alike.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import TracebackType

MAX_SHARD_SIZE = 10_000  # the key holds the index in the shard in 4 digits
MAX_SHARDS = 100_000  # ... and the shard number in 5


def sample_key(index: int, shard_size: int, prefix: str = "") -> str:
    """img2dataset-style key: 5-digit shard number + 4-digit position in the shard."""
    return f"{prefix}{index // shard_size:05d}{index % shard_size:04d}"


def shard_name(shard: int, prefix: str = "") -> str:
    return f"{prefix}{shard:05d}.tar"


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed mtime/owner/mode so identical content gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


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


def brace_pattern(out_dir: str | os.PathLike, names: list[str], prefix: str = "") -> str:
    """A WebDataset brace pattern for consecutive shard names, e.g. 'dir/{00000..00004}.tar'."""
    numbers = sorted(int(n[len(prefix):-len(".tar")]) for n in names)
    if len(numbers) == 1:
        return str(Path(out_dir) / shard_name(numbers[0], prefix))
    return str(Path(out_dir) / f"{prefix}{{{numbers[0]:05d}..{numbers[-1]:05d}}}.tar")


class RollingShardWriter:
    """Samples in order into `out/00000.tar`, `out/00001.tar`, ... with `shard_size` samples per shard.

    A shard is created only once a sample arrives (no empty tars) and is renamed into place only when
    complete, so a crash or Ctrl-C never leaves a truncated shard that a loader would trip over later.
    `sizes` maps each finished shard's file name to its sample count.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int) -> None:
        if not 1 <= shard_size <= MAX_SHARD_SIZE:
            raise ValueError(f"shard_size must be in [1, {MAX_SHARD_SIZE}], got {shard_size}")
        self.out = Path(out_dir)
        self.shard_size = shard_size
        self.count = 0  # samples written so far = the global index of the next one
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def write(self, members: dict[str, bytes]) -> str:
        """Add one sample (`{"jpg": ..., "txt": ..., "json": ...}`) under the next key and return the key."""
        shard = self.count // self.shard_size
        if shard >= MAX_SHARDS:
            raise ValueError(f"more than {MAX_SHARDS} shards: raise the shard size")
        if self._tar is None:
            self._tmp = self.out / f".{shard_name(shard)}.tmp-{os.getpid()}"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        key = sample_key(self.count, self.shard_size)
        for ext, data in members.items():
            add_tar_member(self._tar, f"{key}.{ext}", data)
        self.count += 1
        if self.count % self.shard_size == 0:
            self._finish()
        return key

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        shard = (self.count - 1) // self.shard_size
        os.replace(self._tmp, self.out / shard_name(shard))
        self.sizes[shard_name(shard)] = self.count - shard * self.shard_size
        self._tar = self._tmp = None

    def close(self) -> None:
        """Finish the last (possibly short) shard."""
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard in progress; finished shards stay."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar = self._tmp = None

    def __enter__(self) -> RollingShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
