"""Turn `cfg.deepspeed` plus trainer/data settings into DeepSpeed's config dict (batch sizes derived)."""
from __future__ import annotations

import logging
from typing import Any

from mmpt.engine.config import TrainConfig

log = logging.getLogger("mmpt")


def build_deepspeed_config(cfg: TrainConfig, world_size: int, keep_zero_stage: bool = False) -> dict[str, Any]:
    """train_batch_size = micro batch x grad accumulation x world size, never set by hand.

    With contrastive gradient caching every micro-batch is one engine.backward, so DeepSpeed accumulates
    grad_accum x contrastive_accum_steps of them (and divides each by that; mmpt/engine/grad_cache.py
    scales its surrogate loss back). On one process ZeRO-1/2 run as stage 0 (see `single_rank_zero_stage`)
    unless `keep_zero_stage` (resuming a checkpoint written before that rule, whose optimizer state is in
    ZeRO's partition files)."""
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
    zero = dict(ds.get("zero_optimization") or {"stage": 0})
    if not keep_zero_stage:
        zero = single_rank_zero_stage(zero, world_size)
    ds["zero_optimization"] = zero
    if zero.get("stage", 0) > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)
    if mmpt_grad_clip(cfg, ds) > 0:
        ds["gradient_clipping"] = 0.0  # mmpt clips itself (micro_step): DeepSpeed's clip loops per parameter
    return ds


def single_rank_zero_stage(zero: dict[str, Any], world_size: int) -> dict[str, Any]:
    """ZeRO-1/2 partition optimizer states and gradients across data-parallel ranks; with one rank there is
    nothing to partition, and DeepSpeed still pays per-parameter gradient hooks, a copy of every gradient into
    its buckets, an all-reduce with itself and, in fp32, a second fp32 copy of the weights (3-6% of a tiny
    model's CPU step, measured by scripts/bench/bench_train_step.py). Stage 0 does the same update. Offload
    (ZeRO-Offload on one GPU) is kept: it is what makes a large model fit, not partitioning."""
    if world_size != 1 or zero.get("stage", 0) not in (1, 2) or any(k.startswith("offload") for k in zero):
        return zero
    log.info("one process: ZeRO-%d runs as stage 0 (nothing to partition; same update, fewer copies)", zero["stage"])
    return {"stage": 0}


def mmpt_grad_clip(cfg: TrainConfig, ds: dict[str, Any]) -> float:
    """The clip norm mmpt applies itself, 0 when DeepSpeed does it. At stage 0 in fp32 DeepSpeed's optimizer is
    the bare torch one: its clipping loops over parameters in Python and reports no gradient norm, so mmpt
    clips with torch's fused clip_grad_norm_ and keeps the norm for train/grad_norm (ZeRO and bf16/fp16
    optimizers clip their own fp32 gradients and report the norm)."""
    stage0 = dict(ds.get("zero_optimization") or {}).get("stage", 0) == 0
    clip = float(cfg.trainer.grad_clip or 0.0)
    return clip if stage0 and cfg.trainer.precision == "fp32" and clip > 0 else 0.0


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Samples per optimizer step; the contrastive batch is data.batch_size x contrastive_accum_steps x world."""
    t = cfg.trainer
    return cfg.data.batch_size * t.grad_accum * t.contrastive_accum_steps * world_size


def skip_single_rank_allreduce(engine: Any, world_size: int) -> None:
    """Stage 0 all-reduces the gradients after every backward (flatten, all-reduce, copy back): with one rank
    that is copies for nothing. ZeRO-1/2/3 keep it: their reduction is what moves gradients into partitions."""
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
