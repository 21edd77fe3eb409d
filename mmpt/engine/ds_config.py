"""Turn `cfg.deepspeed` plus trainer/data settings into DeepSpeed's config dict (batch sizes derived)."""
from __future__ import annotations

from typing import Any

from mmpt.engine.config import TrainConfig


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """train_batch_size = micro batch x grad accumulation x world size, never set by hand.

    With contrastive gradient caching every micro-batch is one engine.backward, so DeepSpeed accumulates
    grad_accum x contrastive_accum_steps of them (and divides each by that; mmpt/engine/grad_cache.py
    scales its surrogate loss back)."""
    ds: dict[str, Any] = dict(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.trainer.grad_accum * cfg.trainer.contrastive_accum_steps
    ds["train_batch_size"] = global_batch_size(cfg, world_size)
    ds["gradient_clipping"] = cfg.trainer.grad_clip
    ds["bf16"] = {"enabled": cfg.trainer.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.trainer.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    ds.setdefault("steps_per_print", 10**9)  # mmpt prints its own progress lines
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Samples per optimizer step; the contrastive batch is data.batch_size x contrastive_accum_steps x world."""
    t = cfg.trainer
    return cfg.data.batch_size * t.grad_accum * t.contrastive_accum_steps * world_size
