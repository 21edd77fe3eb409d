"""Samples from one tar shard, with every way a shard can be broken reported, never a silently short read.

Why not webdataset's `tarfile_samples`: Python's streaming tarfile ends iteration quietly when it meets an
invalid header after the first member (garbage in the middle of a shard) or a short last header (a truncated
shard), so a damaged shard just looked shorter. Here the reason iteration stopped is recorded (`_EndAware`):
only the all-zero end-of-archive block counts as a clean end; anything else, and every read error, is one
`bad_tar` for the shard (`on_bad(url, detail)`), with the samples read before the damage kept. Grouping files
into samples is webdataset's `group_by_keys`.
"""
from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from webdataset import gopen
from webdataset.tariterators import group_by_keys


class _EndAware(tarfile.TarInfo):
    """TarInfo whose header parsing leaves the last header error on the archive (`archive.last_header_error`)."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as exn:
            archive.last_header_error = exn  # type: ignore[attr-defined]
            raise


def _end_problem(archive: tarfile.TarFile) -> str | None:
    """None when iteration stopped at the end-of-archive block; else what stopped it."""
    exn = getattr(archive, "last_header_error", None)
    if isinstance(exn, tarfile.EOFHeaderError):
        return None
    if isinstance(exn, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        return f"truncated: the data ends at byte {archive.offset} without the end-of-archive block"
    return f"garbage at byte {archive.offset}: {exn or 'not a tar header'}; the rest of the shard is unreadable"


def _files(url: str, on_bad: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    """{fname, data, __url__} for each regular member of the shard, in order; one `on_bad` at most."""
    try:
        stream = gopen(url, "rb")
    except Exception as exn:  # gopen raises OSError, ValueError, ... for an unreadable url
        on_bad(url, f"cannot open: {exn!r}")
        return
    problem, abandoned = None, False
    try:
        with stream:
            archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAware)
            for member in archive:
                archive.members = []  # streaming: keep no member list (memory grows per member otherwise)
                if not member.isreg() or (member.name.startswith("__") and member.name.endswith("__")):
                    continue  # directories, links; webdataset's "__meta__" files
                reader = archive.extractfile(member)
                assert reader is not None  # a regular member
                try:
                    yield {"fname": member.name, "data": reader.read(), "__url__": url}
                except GeneratorExit:  # the reader stopped early: a pipe's exit status on close is no damage
                    abandoned = True
                    raise
            problem = _end_problem(archive)
    except Exception as exn:  # tarfile.ReadError, OSError, zlib/gzip errors, a pipe's non-zero exit on close
        if abandoned:
            return
        problem = f"{type(exn).__name__}: {exn}"
    if problem is not None:
        on_bad(url, problem)


def tar_samples(url: str, on_bad: Callable[[str, str], None],
                handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """WebDataset samples (`__key__`, `__url__`, one entry per extension) of one shard.

    on_bad(url, detail): called once if the shard is unreadable, truncated or damaged; handler: webdataset's
    handler for malformed samples (e.g. a duplicate file name), return True to go on."""
    return group_by_keys(_files(url, on_bad), handler=handler)
