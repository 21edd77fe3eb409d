"""Divergence guards: a step whose gradient norm or loss is non-finite (or whose loss spikes) is skipped and
counted, `trainer.max_bad_steps` skipped steps in a row stop the run, and non-finite weights are never saved.

How a step is skipped without a host sync per step (the decision must be the same on every rank):

- The loss check is folded into the gradient. Each micro-batch's loss is multiplied by a 0-d factor that is
  1.0 when the loss is finite (and no spike) and NaN otherwise (`poison`): value and gradient are
  bit-identical when it is 1.0, and otherwise NaN runs through backward and the data-parallel all-reduce into
  the global gradient norm of every rank. The one input of the decision is therefore that global norm, which
  every path reduces anyway and which is identical on all ranks.
- DeepSpeed's own optimizers (bf16, fp16, ZeRO-1/2/3) already test that norm on the host in their step()
  (`is_invalid_grad_norm`: DeepSpeed's sync, every step) and skip the update and the scheduler on overflow;
  the guard only reads `engine.was_step_applied()`, a host bool, at no cost.
- mmpt's own step (stage 0 in fp32, where DeepSpeed hands the bare torch AdamW over): the norm is mmpt's
  clipping norm (engine_step.backward_and_step; computed here when clipping is off), and the skip is applied
  on the device through fused AdamW's `found_inf` (an optimizer pre-step hook sets it): the kernel leaves
  weights, moments and step counts untouched, and nothing waits for the host. The host learns the outcome
  from a non-blocking copy of that flag, read at once on CPU (free: CPU kernels have finished) and one step
  later on CUDA (finished by then, so no stall). A skip rewinds the LR scheduler one step before the next
  update, so every applied update uses the lr of the applied-step count, as DeepSpeed's overflow skip does.
  On CUDA, because of that one-step lag, a momentum teacher has already taken its EMA step toward the
  unchanged student when the skip is learned; everywhere else the teacher hook is not called for a skip.

Save and log steps sync anyway: they settle the pending flag first, so counts and the save decision are exact.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmpt import distributed as mdist

log = logging.getLogger("mmpt")

SPIKE_WARMUP = 20  # accepted steps before the spike guard compares (the average needs a few steps to settle)
SPIKE_WINDOW = 20  # the moving average: a running mean over the first steps, then an EMA with weight 1/20


class DivergenceError(RuntimeError):
    """`trainer.max_bad_steps` optimizer steps in a row were skipped: the run stops (exit 1)."""


def weights_finite(module: torch.nn.Module) -> bool:
    """Collective: are all parameters and floating buffers finite on every rank? ZeRO-3 keeps each rank's
    partition in `ds_tensor` (the module's own tensors are empty placeholders there)."""
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    device = tensors[0].device if tensors else torch.device("cpu")
    ok = torch.stack([t.isfinite().all() for t in tensors if t.numel()] or [torch.ones((), dtype=torch.bool, device=device)])
    flag = ok.all().to(torch.float32).reshape(1)
    if mdist.is_dist():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def is_plain_torch_optimizer(optimizer: Any) -> bool:
    """True at stage 0 in fp32: DeepSpeed passes the client's torch optimizer through (no overflow logic)."""
    return isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("torch.optim")


def to_host_later(flag: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A host copy of a 0-d device flag and a CUDA event to wait on before reading it (None: readable now).
    On CUDA the copy is queued into pinned memory, so queuing it does not wait for the GPU."""
    if flag.device.type != "cuda":
        return flag.to("cpu"), None  # CPU: already computed; other devices: a plain (blocking) copy
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class DivergenceGuard:
    """One per trainer. Per micro-batch: `poison(loss)`; per optimizer step: `after_step()`; then
    `stop_if_diverged(last_good)`; before a save: `safe_to_save(module)`; for a log line: `skipped_steps`."""

    def __init__(self, engine: Any, max_bad_steps: int, spike_factor: float | None, device: torch.device,
                 mmpt_clips: bool, spike_warmup: int = SPIKE_WARMUP):
        self.engine, self.max_bad_steps, self.spike_factor = engine, max_bad_steps, spike_factor
        self.spike_warmup, self.mmpt_clips = spike_warmup, mmpt_clips
        self.skipped_steps = 0  # host counts, identical on every rank (the decision is global)
        self.spike_skips = 0  # skipped steps in which this rank's loss spiked
        self.bad_streak = 0
        self.own_step = is_plain_torch_optimizer(engine.optimizer)
        zero = torch.zeros((), device=device)
        self._avg, self._accepted = zero.clone(), zero.clone()  # moving average of accepted step losses, count
        self._step_loss, self._step_micro, self._step_spiked = zero.clone(), zero.clone(), zero.clone()
        self._found_inf: torch.Tensor | None = None
        self._pending: deque[tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]] = deque()
        if self.own_step:
            engine.optimizer.register_step_pre_hook(self._mask_update)

    def rank_state(self) -> dict[str, float]:
        """This rank's spike-guard memory for a checkpoint (read at save time only), so a resumed run skips the
        same steps as an uninterrupted one."""
        return {"spike_avg": float(self._avg), "spike_accepted": float(self._accepted), "spike_skips": self.spike_skips}

    def load_rank_state(self, state: dict[str, float]) -> None:
        self._avg.fill_(state["spike_avg"])
        self._accepted.fill_(state["spike_accepted"])
        self.spike_skips = int(state["spike_skips"])

    # ---- per micro-batch ----------------------------------------------------------------------------------
    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times 1.0 (finite, no spike) or NaN: the decision travels inside the gradient (see module doc)."""
        value = loss.detach().float()
        finite = torch.isfinite(value)
        ok = finite
        if self.spike_factor is not None:
            spike = (self._accepted >= self.spike_warmup) & (value > self.spike_factor * self._avg)
            self._step_spiked = torch.maximum(self._step_spiked, spike.float())
            ok = ok & ~spike
            self._step_loss = self._step_loss + torch.where(finite, value, 0.0)
            self._step_micro = self._step_micro + 1
        return loss * torch.where(ok, 1.0, float("nan")).to(loss.dtype)

    # ---- per optimizer step -------------------------------------------------------------------------------
    @torch.no_grad()
    def _mask_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer pre-step hook (mmpt's own step): the update is skipped on the device when the global
        gradient norm is non-finite. The norm is mmpt's clipping norm when it clips, else computed here."""
        norm = self.engine._global_grad_norm if self.mmpt_clips else None
        if not isinstance(norm, torch.Tensor):  # only then the gradients are walked here
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if not self.mmpt_clips:
                self.engine._global_grad_norm = norm  # train/grad_norm, as when mmpt clips
        found_inf = (~torch.isfinite(norm)).float()
        self._found_inf = found_inf
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = found_inf  # the fused kernel skips params, moments and step counts
        elif bool(found_inf):  # unfused (neither CPU nor CUDA): a host read, then no gradient = no update
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None

    def after_step(self) -> bool | None:
        """Call once per optimizer step, after engine.step(). Returns whether this step's update was applied,
        or None when that is learned only at the next step (mmpt's own step on CUDA)."""
        step_loss = self._step_loss / self._step_micro.clamp(min=1)
        spiked = self._step_spiked
        self._step_loss, self._step_micro, self._step_spiked = (torch.zeros_like(step_loss) for _ in range(3))
        if not self.own_step:
            applied = bool(self.engine.was_step_applied())
            self._settle(applied, step_loss, spiked)
            return applied
        assert self._found_inf is not None, "the optimizer pre-step hook did not run"
        flag, ready = to_host_later(self._found_inf)
        self._pending.append((flag, ready, step_loss, spiked))
        if ready is None:  # CPU: already computed, reading it costs nothing
            return self.settle_pending()
        while len(self._pending) > 1:  # CUDA: the previous step's flag, finished by now
            self._settle_oldest()
        return None

    def settle_pending(self) -> bool | None:
        """Resolve every step whose outcome is still pending (a sync on CUDA: call it where one happens anyway).
        Returns the last one's outcome."""
        applied = None
        while self._pending:
            applied = self._settle_oldest()
        return applied

    def _settle_oldest(self) -> bool:
        flag, ready, step_loss, spiked = self._pending.popleft()
        if ready is not None:
            ready.synchronize()  # waits only for the step that wrote the flag
        applied = not bool(flag)
        if not applied:  # the engine stepped the scheduler regardless: take that step back
            scheduler = self.engine.lr_scheduler
            if scheduler is not None:
                scheduler.last_epoch -= 2
                scheduler.step()
        self._settle(applied, step_loss, spiked)
        return applied

    def _settle(self, applied: bool, step_loss: torch.Tensor, spiked: torch.Tensor) -> None:
        if applied:
            self.bad_streak = 0
            if self.spike_factor is not None:  # device arithmetic only: a running mean, then an EMA
                weight = 1.0 / torch.clamp(self._accepted + 1, max=SPIKE_WINDOW)
                self._avg = self._avg + weight * (step_loss - self._avg)
                self._accepted = self._accepted + 1
            return
        self.skipped_steps += 1
        self.bad_streak += 1
        if self.spike_factor is not None and bool(spiked):
            self.spike_skips += 1

    def stop_if_diverged(self, step: int, last_good: Callable[[], Path | None]) -> None:
        """Raise DivergenceError after `max_bad_steps` skipped steps in a row (same step on every rank)."""
        if self.bad_streak < self.max_bad_steps:
            return
        good = last_good()
        fix = "a lower optimizer.lr or a longer scheduler.warmup_steps"
        where = (f"last good checkpoint: {good}. To go on from its weights, start a new run with "
                 f"model.init.checkpoint={good} (a fresh optimizer and schedule: trainer.resume would restore the "
                 f"learning rate that diverged) and {fix}" if good
                 else f"no checkpoint was saved before it. Start again with {fix}")
        raise DivergenceError(
            f"training diverged: {self.bad_streak} optimizer steps in a row up to step {step} were skipped "
            f"(non-finite gradient norm or loss{', or a loss spike' if self.spike_factor else ''}; "
            f"trainer.max_bad_steps={self.max_bad_steps}); {where}"
        )

    def safe_to_save(self, module: torch.nn.Module, step: int, last_good: Path | None) -> bool:
        """Collective. False (and a warning) when the last step was skipped or a weight is non-finite: such a
        save would replace or prune the last good checkpoint without adding a good one."""
        self.settle_pending()
        finite = weights_finite(module)
        if finite and self.bad_streak == 0:
            return True
        why = "weights are non-finite" if not finite else f"the last {self.bad_streak} step(s) were skipped"
        if mdist.rank() == 0:
            log.warning("not saving a checkpoint at step %d: %s; the last good checkpoint stays %s",
                        step, why, last_good or "(none yet)")
        return False
