"""The one backward + step through a DeepSpeed engine, shared by the plain micro-step and GradCache."""
from __future__ import annotations

from typing import Any

import torch


def backward_and_step(engine: Any, loss: torch.Tensor, grad_clip: float = 0.0) -> None:
    """engine.backward(loss), then engine.step() (DeepSpeed updates only at accumulation boundaries).

    grad_clip > 0 (ds_config.mmpt_grad_clip: one process at stage 0 in fp32, where DeepSpeed's clipping loops
    over parameters in Python and reports no norm): mmpt clips with torch's fused clip_grad_norm_ at the
    boundary and hands the norm to the engine, where get_global_grad_norm() reads it as it does ZeRO's.
    """
    engine.backward(loss)
    if grad_clip > 0 and engine.is_gradient_accumulation_boundary():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    engine.step()
