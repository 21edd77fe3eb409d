"""How DataLoader workers start, which signals they obey, and how a loader's workers are ended.

Why this matters: SLURM signals every process of a task (USR1 as a warning, TERM at the time limit), and a
worker that dies of it makes PyTorch raise in the trainer mid-step, before it can checkpoint; so workers
ignore those signals while training (preemption belongs to mmpt.engine.preemption). But Python's exit
handler (multiprocessing's atexit) stops daemonic workers with SIGTERM and then waits for them: a worker
that ignores TERM there makes every error path hang for ever. So each loader owns a shutdown Event: once
it is set (the trainer's `finally`, or interpreter exit), TERM ends the worker. Workers also die with their
rank (PR_SET_PDEATHSIG), so a rank killed with -9 leaves no orphans.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

from torch.utils.data import DataLoader

from mmpt.parent_death import die_with_parent

_EVENTS: list[Event] = []  # every shutdown Event made in this process, set at interpreter exit


def new_shutdown_event() -> Event:
    """An Event the workers of one loader check on TERM (made before the workers fork, so they share it)."""
    event = multiprocessing.Event()
    _EVENTS.append(event)
    return event


def _release_all_at_exit() -> None:
    """Registered after multiprocessing's own exit handler, so it runs BEFORE it (atexit is LIFO): by the
    time multiprocessing terminates daemonic workers with TERM, every worker obeys TERM."""
    for event in _EVENTS:
        event.set()


atexit.register(_release_all_at_exit)


class WorkerInit:
    """`worker_init_fn`: quiet tokenizer threads, die with the rank, ignore SLURM's signals while training.

    A class rather than a closure so it pickles under spawn/forkserver start methods too."""

    def __init__(self, shutdown: Event):
        self.shutdown = shutdown

    def __call__(self, _worker_id: int) -> None:
        # each worker tokenizes its own batches; rayon threads per worker would only oversubscribe the CPUs
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        die_with_parent(signal.SIGKILL)  # the rank is gone: nothing will read our batches
        for number in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(number, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, number: int, _frame: FrameType | None) -> None:
        """Ignored while the trainer trains (SLURM's TERM goes to the trainer, which checkpoints first);
        the worker exits at once when its loader is shutting down."""
        if self.shutdown.is_set():
            os._exit(128 + number)


def shutdown_workers(dataloader: DataLoader, shutdown: Event, iterator: Any = None) -> None:
    """End a loader's workers now (not at interpreter exit, when PyTorch's own shutdown is a no-op).

    Sets the Event first, so a worker that does not stop within PyTorch's join timeout obeys the TERM that
    follows. `iterator`: a non-persistent loader's live iterator (a persistent one keeps it on the loader)."""
    shutdown.set()
    for it in (getattr(dataloader, "_iterator", None), iterator):
        stop = getattr(it, "_shutdown_workers", None)
        if stop is not None:
            stop()
    if getattr(dataloader, "_iterator", None) is not None:
        dataloader._iterator = None  # a later iter() starts fresh workers instead of reusing dead ones
    if shutdown in _EVENTS:
        _EVENTS.remove(shutdown)  # done with: a long run making an eval loader per eval keeps no list of them
