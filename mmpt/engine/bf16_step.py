"""A faster optimizer step for DeepSpeed bf16 without ZeRO (stage 0, any number of ranks).

There DeepSpeed wraps mmpt's torch AdamW in its `FP16_UnfusedOptimizer`, whose step walks the parameters in
Python several times: an inf/NaN test per gradient, a norm per gradient, a freshly allocated fp32 copy of each
gradient, an unscale per gradient, then a copy of each fp32 master weight back into its bf16 weight (about 8
small ops x 140 tensors for a width-128 BEiT-3; on a GPU each is a kernel launch). `use_foreach_bf16_step`
replaces that one method with the same update done by multi-tensor ops: gradient copies into fp32 buffers kept
across steps, their norms in one call and the global norm from them (non-finite = overflow: the same skip, via
DeepSpeed's own `_skip_invalid_grad_norm`), DeepSpeed's own clip/unscale factor, the wrapped optimizer's step,
and one multi-tensor copy back. State, checkpoints, `get_global_grad_norm()` and `was_step_applied()` are
DeepSpeed's, unchanged (tests/test_bf16_step.py: the same weights as DeepSpeed's step to 1e-6, skips included).
On one CPU process `engine.step()` of the width-128 BEiT-3 of scripts/bench/bench_vs_peers.py takes 10.3 ms
instead of 16.6 ms.
"""
from __future__ import annotations

import logging
import math
import types
from typing import Any

import torch

log = logging.getLogger("mmpt")


def use_foreach_bf16_step(engine: Any) -> bool:
    """Give `engine`'s optimizer the multi-tensor step when it is DeepSpeed's unfused bf16 optimizer without
    model parallelism or MoE parameters (what mmpt builds at stage 0 in bf16); returns whether it did."""
    opt = engine.optimizer
    if type(opt).__name__ != "FP16_UnfusedOptimizer" or getattr(opt, "low_precision_dtype", None) != torch.bfloat16:
        return False
    if opt.fused_lamb_legacy or opt.mpu is not None or opt.custom_loss_scaler:
        return False
    if any(getattr(p, "allreduce", True) is False for group in opt.fp16_groups for p in group):  # MoE experts
        return False
    opt._mmpt_grad_buffers = None
    opt.step = types.MethodType(_foreach_step, opt)  # an instance attribute: only this optimizer changes
    log.debug("bf16 at stage 0: DeepSpeed's unfused optimizer steps with multi-tensor ops (mmpt/engine/bf16_step.py)")
    return True


def _foreach_step(self: Any, closure: Any = None) -> bool:
    """`FP16_UnfusedOptimizer.step` (bf16, no MoE, no model parallelism) with multi-tensor ops; returns overflow."""
    low = [p for group in self.fp16_groups for p in group]
    master = [p for group in self.fp32_groups for p in group]
    if self._mmpt_grad_buffers is None:  # fp32 gradients, allocated once instead of every step
        self._mmpt_grad_buffers = [torch.empty_like(p) for p in master]
    buffers = self._mmpt_grad_buffers
    grads = [p.grad for p in low]
    present = [g for g in grads if g is not None]
    if present:
        torch._foreach_copy_([b for b, g in zip(buffers, grads) if g is not None], present)
    for b, g in zip(buffers, grads):
        if g is None:
            b.zero_()  # DeepSpeed steps a parameter without a gradient with a zero one
    norms = torch._foreach_norm(buffers, 2.0)  # of the fp32 copies: the same values as DeepSpeed's norm
    total = float(torch.linalg.vector_norm(torch.stack(norms)))  # the host sync DeepSpeed makes too
    if not math.isfinite(total):  # an inf/NaN gradient (or a norm past fp32's range): DeepSpeed skips the step
        return self._skip_invalid_grad_norm()
    self.overflow = False
    self._global_grad_norm = total
    self._update_scale(False)
    combined = self.unscale_and_clip_grads(total, apply_scale=False)  # DeepSpeed's own loss-scale x clip factor
    if combined != 1.0:
        torch._foreach_mul_(buffers, 1.0 / combined)
    for p, b in zip(master, buffers):
        p.grad = b
    self.optimizer.step()
    for p in master:
        p.grad = None  # as DeepSpeed: no fp32 gradient outside the step
    torch._foreach_copy_([p.data for p in low], [p.data for p in master])
    return self.overflow
