"""Where DeepSpeed's JIT-built ops (the CPU shared-memory comm op, 75-140 s to build here) are cached: inside the
active virtual environment, so each venv or clone builds it once and keeps it, instead of rebuilding it on every
start or sharing one folder between venvs with different torch/DeepSpeed versions. Runs at `import mmpt`,
before any mmpt code imports DeepSpeed; a TORCH_EXTENSIONS_DIR the user set always wins.

Also here, because they too stop a start: `use_venv_ninja` (one ninja per venv, or every other start rebuilds the
op) and `watch_build_locks` (a lock left by a killed build is removed instead of blocking every start).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path

ENV_VAR = "TORCH_EXTENSIONS_DIR"
FOLDER = "torch_extensions"


def default_torch_extensions_dir(environ: MutableMapping[str, str] = os.environ, prefix: str = sys.prefix,
                                 base_prefix: str = sys.base_prefix) -> str | None:
    """Set TORCH_EXTENSIONS_DIR to `<venv>/torch_extensions` when it is unset and Python runs in a writable venv;
    returns the value in effect (None: torch's own default, ~/.cache/torch_extensions/<py>_<cuda>)."""
    if environ.get(ENV_VAR):
        return environ[ENV_VAR]
    if Path(prefix).resolve() == Path(base_prefix).resolve() or not os.access(prefix, os.W_OK):
        return None  # no venv (or a read-only one): keep torch's default
    environ[ENV_VAR] = str(Path(prefix) / FOLDER)
    return environ[ENV_VAR]


def use_venv_ninja(environ: MutableMapping[str, str] = os.environ, prefix: str = sys.prefix,
                   base_prefix: str = sys.base_prefix) -> str | None:
    """Build with the venv's own ninja (the pip `ninja` package) when it has one, even if the venv is not
    activated; returns the ninja in effect (None: none in the venv, PATH's stays).

    Why: torch runs `ninja` from PATH. A process started as `.venv/bin/mmpt-train` without activation finds the
    system ninja, an activated one the venv's; two ninja versions hash build commands differently (log v5 vs
    v7), so each sees the other's build as out of date and rebuilds the op (50-120 s) on every alternation."""
    own = Path(prefix) / "bin" / "ninja"
    if Path(prefix).resolve() == Path(base_prefix).resolve() or not (own.is_file() and os.access(own, os.X_OK)):
        return None  # not a venv, or one without ninja: PATH decides, as before
    found = shutil.which("ninja", path=environ.get("PATH"))
    if found is None or Path(found).resolve() != own.resolve():
        environ["PATH"] = os.pathsep.join(p for p in (str(own.parent), environ.get("PATH", "")) if p)
    return str(own)


# ---- stale build locks -------------------------------------------------------------------------------------
# torch builds an op under `<build dir>/lock` (created with O_EXCL, held open by the builder, removed when
# done); everyone else polls for it to vanish, for ever and silently. A builder killed mid-build leaves the
# file behind, and every later start hangs. A live builder on this host holds the file open (visible in
# /proc/*/fd); on a network filesystem a builder on another host is invisible, so there only an old lock
# (older than STALE_AFTER_S, far above the 75-140 s a build takes) counts as stale.
STALE_AFTER_S = 900.0
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse", "9p", "panfs", "wekafs")
log = logging.getLogger("mmpt")


def build_root(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Where torch builds JIT ops: TORCH_EXTENSIONS_DIR, else torch's default root."""
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    return Path.home() / ".cache" / "torch_extensions"


def _lock_held(lock: Path) -> bool:
    """Whether a process on this host has `lock` open (the builder keeps the fd of the file it created).
    True also when that cannot be told: the lock belongs to another user, whose processes we may not see."""
    if lock.stat().st_uid != os.geteuid() and os.geteuid() != 0:
        return True
    target = str(lock.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # the process ended meanwhile, or is not ours to read (not a builder of our lock)
            continue
    return False


def _on_network_fs(path: Path) -> bool:
    """True when `path` lies on a filesystem other hosts may share (or when that cannot be told)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return True
    resolved, best, fstype = str(path.resolve()), "", "?"
    for point, kind in mounts:
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, fstype = point, kind
    return fstype == "?" or any(fstype.startswith(n) for n in NETWORK_FS)


def _unheld(lock: Path) -> os.stat_result | None:
    """The lock's stat when no process holds it, else None (held, or gone)."""
    try:
        seen = lock.stat()
        if _lock_held(lock) or lock.stat().st_ino != seen.st_ino:
            return None  # a live builder (waiting is right), or the lock was released and taken anew meanwhile
        return seen
    except FileNotFoundError:
        return None  # released meanwhile


def clear_stale_build_locks(root: Path, stale_after_s: float = STALE_AFTER_S, confirm_s: float = 1.0) -> list[str]:
    """Remove build locks no live process holds (and, on a network filesystem, older than `stale_after_s`);
    returns one message per lock removed or left waiting, for the log.

    A lock must be seen unheld twice, `confirm_s` apart, with the same inode: a builder closes its fd just
    before it removes the file, and removing it in that instant would make the builder's own remove fail."""
    candidates = [(lock, seen) for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]
                  if (seen := _unheld(lock)) is not None]
    if candidates:
        time.sleep(confirm_s)
    messages: list[str] = []
    for lock, first in candidates:
        seen = _unheld(lock)
        if seen is None or seen.st_ino != first.st_ino:
            continue
        age = time.time() - seen.st_mtime
        if not _on_network_fs(lock) or age >= stale_after_s:
            try:
                lock.unlink()
            except FileNotFoundError:
                continue
            messages.append(f"removed the stale DeepSpeed/torch op-build lock {lock} ({age:.0f} s old, no build "
                            "process holds it): an earlier build was killed; the op is checked and rebuilt if incomplete")
        else:
            messages.append(f"waiting on the op-build lock {lock} ({age:.0f} s old): no build process on this host "
                            f"holds it and it is on a shared filesystem, so a build may run on another host; it is "
                            f"removed once {stale_after_s:.0f} s old, or delete it yourself if no build runs")
    return messages


def watch_build_locks(root: Path | None = None, interval_s: float = 5.0, for_s: float = 3600.0) -> threading.Thread:
    """A daemon thread that clears (or reports, once each) stale build locks while DeepSpeed starts up."""
    where = build_root() if root is None else root
    reported: set[str] = set()

    def watch() -> None:
        deadline = time.time() + for_s
        while time.time() < deadline:
            if where.is_dir():
                for message in clear_stale_build_locks(where):
                    key = message.split(" (")[0]  # a waiting lock is reported once, not every interval
                    if key not in reported:
                        log.warning("%s", message)
                    if message.startswith("waiting"):
                        reported.add(key)
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name="mmpt-build-lock-watch", daemon=True)
    thread.start()
    return thread
