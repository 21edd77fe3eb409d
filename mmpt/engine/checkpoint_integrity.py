"""Is a checkpoint tag whole, and why a save failed: the manifest a marker records, one-line problems.

`checkpoint.save` renames a tag into place only after every rank wrote its files and rank 0 wrote the
`complete` marker listing each file's size, so a tag that lacks its marker, misses a listed file or holds one
of another size was cut short after the fact (a copy, a disk error, a tool) or left by an mmpt that saved in
place. Such a tag must not be loaded: readers report it in one line instead of a traceback from deep inside
torch.load. The check reads sizes and zip directories only, never unpickles, so it costs milliseconds even for
large tags.
"""
from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

from mmpt.engine.config import ConfigError

COMPLETE_MARKER = "complete"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 1 << 20  # below this, a writer's error (torch's zip writer raises RuntimeError) is a full disk


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (incomplete, corrupt) or written (disk full): one `error:` line, exit 2."""


def manifest(tag_dir: Path) -> dict[str, int]:
    """{path relative to the tag dir: size in bytes} of every file in it but the marker."""
    return {p.relative_to(tag_dir).as_posix(): p.stat().st_size
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER}


def tag_problem(tag_dir: Path) -> str | None:
    """Why `tag_dir` cannot be loaded ('is incomplete: ...' / 'is corrupt: ...'), or None when it is whole."""
    marker_file = tag_dir / COMPLETE_MARKER
    if not marker_file.is_file():
        return (f"is incomplete: it has no `{COMPLETE_MARKER}` marker, so its save never finished "
                "(killed, out of space, or still being written)")
    try:
        marker = json.loads(marker_file.read_text() or "{}")
    except ValueError:
        return f"is corrupt: its `{COMPLETE_MARKER}` marker is not JSON"
    for name, size in (marker.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"is corrupt: {name} is missing (the save wrote {size} bytes)"
        if (found := path.stat().st_size) != size:
            return f"is corrupt: {name} has {found} bytes, the save wrote {size} (truncated or overwritten)"
    for path in sorted(tag_dir.glob("*.pt")):
        problem = torch_file_problem(path)
        if problem:
            return f"is corrupt: {path.name} {problem}"
    return None


def torch_file_problem(path: Path) -> str | None:
    """torch.save writes zip archives whose directory sits at the end: a cut-short file has none."""
    if path.stat().st_size == 0:
        return "is empty"
    with path.open("rb") as f:
        if f.read(2) != b"PK":
            return None  # torch's legacy (non-zip) format: nothing cheap to check
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as exc:
        return f"is truncated or damaged ({exc})"


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the filesystem holding `path` (or its nearest existing parent)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def describe_write_failure(exc: BaseException, path: Path) -> tuple[str, bool]:
    """(what failed, in words; whether the disk is full). torch.save reports ENOSPC as a RuntimeError of its
    zip writer ('unexpected pos ...'), so a writer error on a nearly full filesystem counts as a full disk."""
    free = free_bytes(path)
    code = getattr(exc, "errno", None)
    full = code in DISK_FULL_ERRNOS if code else (free is not None and free < LOW_SPACE_BYTES)
    text = str(exc).strip()
    if code:
        reason = os.strerror(code)
    elif full:
        reason = "no space left on device"  # torch's own words ('unexpected pos 1920 vs 1814') help nobody
    else:
        reason = text.splitlines()[0][:160] if text else type(exc).__name__
    space = f"; {free / 1e6:.1f} MB free there" if free is not None else ""
    return f"{'disk full' if full else 'write failed'} writing {path} ({reason}{space})", full
