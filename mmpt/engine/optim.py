"""AdamW with decay only on matrices, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from mmpt.engine.config import ConfigError, OptimizerConfig, SchedulerConfig
from mmpt.modules.block import no_weight_decay_names

def lr_multiplier(name: str, lr_mult: Mapping[str, float]) -> float:
    """The multiplier of the first `lr_mult` key that is `name` or its last dotted part(s), else 1."""
    for suffix, mult in lr_mult.items():
        if name == suffix or name.endswith("." + suffix):
            return float(mult)
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_mult: Mapping[str, float] | None = None) -> list[dict]:
    """Weight decay shrinks matrices; norms (1-d), biases, position/cls tokens and the temperature stay free
    (the rule lives in mmpt.modules.block.no_weight_decay_names). Only `requires_grad` parameters: frozen ones
    (model.freeze, momentum teachers) must not reach ZeRO's partitions; an emptied group is dropped.
    lr_mult (name suffix -> multiplier, needs lr): matching parameters get their own group at lr * multiplier,
    after the two plain groups (the scheduler scales every group's lr by the same factor)."""
    free = no_weight_decay_names(model)
    lr_mult = lr_mult or {}
    decay, no_decay = [], []
    scaled: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = lr_multiplier(name, lr_mult)
        if mult != 1.0:
            scaled.setdefault((name in free, mult), []).append(param)
        else:
            (no_decay if name in free else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    unmatched = [k for k in lr_mult if not any(lr_multiplier(n, {k: 2.0}) != 1.0 for n, _ in model.named_parameters())]
    if unmatched:  # a typo would otherwise train silently at the base lr
        example = next(n for n, _ in model.named_parameters())
        raise ConfigError(f"optimizer.lr_mult: {unmatched} match no parameter name (a whole name or its last dotted "
                          f"parts, e.g. 'logit_bias' for 'itc.logit_bias'; this model has e.g. {example!r})")
    if scaled and lr is None:
        raise ValueError("param_groups: lr_mult needs the base lr")
    for (is_free, mult), params in scaled.items():
        groups.append({"params": params, "weight_decay": 0.0 if is_free else weight_decay, "lr": lr * mult})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Fused AdamW (one kernel over all tensors) on CUDA and, since torch 2.4, on CPU too: the default
    per-tensor loop costs ~10 ops per parameter tensor (26 ms vs 10 ms per step for a 110-tensor tiny CLIP
    on one core; scripts/bench/bench_vs_peers.py). Other devices keep the default implementation."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_mult), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused
    )


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )
