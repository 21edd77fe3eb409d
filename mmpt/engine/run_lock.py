"""One training per run dir: rank 0 holds an exclusive lock on `<run dir>/run.lock` while the run writes there.

Why: two runs in one dir (a relaunch while orphans of a killed launcher still train, or the same command
started twice) save into the same checkpoint tags and append to the same metrics. The lock is an flock on
an open file, so the kernel drops it when its holder dies, however it dies: a lock file left behind by a
dead run is stale and is taken over, with a note. The file's JSON body (host, pid, start time) names the
holder in the refusal.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mmpt")

LOCK_NAME = "run.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run dir's lock."""


def _holder(body: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (started {when})"


class RunLock:
    """Held from `acquire()` until `release()` or process death."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock of a dead run was taken over, else None.
        Raises RunDirLocked naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                os.close(fd)
                raise RunDirLocked(
                    f"run dir {self.path.parent} is in use by another training ({_describe(holder)}): stop that "
                    f"run first, or choose another hydra.run.dir"
                ) from None
            # a releasing holder may have unlinked the file between our open and flock: lock the file on disk
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, body.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous:
            return f"took over the stale run lock {self.path} of {_describe(previous)}: that process is gone"
        return None

    def release(self) -> None:
        """Remove the file while still holding the lock (a clean end leaves nothing to take over), then unlock."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def lock_run_dir(run_dir: Path, is_main: bool) -> RunLock | None:
    """Collective: rank 0 takes the lock, and every rank stops with the same ConfigError when it is held,
    so no rank waits on a peer that refused. Returns rank 0's held lock (None on other ranks)."""
    from mmpt import distributed as mdist
    from mmpt.engine.config import ConfigError

    lock, outcome = None, None
    if is_main:
        lock = RunLock(run_dir)
        try:
            note = lock.acquire()
            if note:
                log.warning("%s", note)
        except RunDirLocked as exc:
            lock, outcome = None, str(exc)
    refusal = mdist.all_gather_objects(outcome)[0]
    if refusal:
        raise ConfigError(str(refusal))
    return lock
