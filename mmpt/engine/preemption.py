"""Preemption: a signal (SLURM's warning USR1, a TERM) asks the trainer to stop cleanly at a step boundary.

Why a flag and not work in the handler: a Python signal handler runs between two bytecodes of the
training loop, possibly inside a DeepSpeed collective or a half-written checkpoint. The handler only
records the signal; the loop asks `PreemptionWatch.agreed()` after each optimizer step, the ranks agree
(a signal can reach ranks one step apart), and all of them checkpoint the same step and exit together.

Chaining: a handler installed before ours (submitit's requeue handler under Hydra's submitit launcher) is
remembered and called once the checkpoint is written (`chain_previous`), so submitit still requeues the job
and the requeued job resumes from that checkpoint.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("mmpt")

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def signal_number(name: str) -> int:
    """`USR1`, `SIGUSR1` or `10` -> signal number; ValueError naming the valid choices otherwise."""
    text = str(name).strip().upper()
    if text.isdigit():
        return int(signal.Signals(int(text)))
    key = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return int(signal.Signals[key])
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use names such as USR1, USR2, TERM, INT") from None


class PreemptionWatch:
    """Installs flag-setting handlers for `signals` (main thread only) and answers "stop now?" collectively."""

    def __init__(self, signals: Sequence[str]) -> None:
        self.received: int = 0  # the first signal number seen on this rank, 0 = none
        self.previous: dict[int, Handler] = {}
        # The per-step agreement runs on a CPU (gloo) group: on nccl a device flag read back with .item() would
        # sync the host with the GPU every step. Collective: every rank builds the watch at the same point.
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        if threading.current_thread() is not threading.main_thread():
            if signals:
                log.warning("not in the main thread: preemption signals %s are not handled", list(signals))
            return
        for name in signals:
            number = signal_number(name)
            self.previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, _frame: FrameType | None) -> None:
        if not self.received:
            self.received = number
            log.warning("received %s: checkpointing after the current step", signal.Signals(number).name)

    def agreed(self) -> int:
        """Collective when distributed: the signal number if ANY rank received one, else 0.

        One tiny all-reduce (MAX); call it at the same steps on every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)  # CPU: no device sync
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def restore(self) -> None:
        """Put the handlers we replaced back (so a later `chain_previous` or a second signal behaves as before)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def chain_previous(self, number: int) -> None:
        """Call the handler that was installed before ours for `number`, if it is a Python callable
        (submitit requeues and exits there); default/ignore handlers are left alone."""
        handler = self.previous.get(number)
        if callable(handler):
            log.info("passing %s on to the previously installed handler", signal.Signals(number).name)
            handler(number, None)

