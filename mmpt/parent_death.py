"""Die with the parent: a process whose parent is gone (a launcher killed with -9, a rank killed under its
DataLoader workers) must not live on as an orphan that keeps training, writing checkpoints or holding locks.

Linux's PR_SET_PDEATHSIG asks the kernel to send a signal when the parent dies; elsewhere this is a no-op.
The kernel ties it to the parent THREAD that forked us: callers use it only for children forked from a
long-lived main thread (torchrun's agent, a rank's training loop).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """Ask for `signum` when the parent dies; if it already died before the request took effect (we were
    re-parented in between), send it now. True when the request is in place (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died between our reading its pid and the request
        os.kill(os.getpid(), signum)
    return True
