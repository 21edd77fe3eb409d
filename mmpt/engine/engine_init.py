"""The trainer's DeepSpeed engine, built one way for the trainer and the benches that measure its step."""
from __future__ import annotations

from typing import Any

import torch

from mmpt.engine.bf16_step import use_foreach_bf16_step
from mmpt.engine.config import TrainConfig
from mmpt.engine.ds_config import build_deepspeed_config, mmpt_grad_clip, skip_single_rank_allreduce


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, world_size: int,
                      lr_scheduler: Any = None, keep_zero_stage: bool = False) -> tuple[Any, float]:
    """(engine, the clip norm mmpt applies itself): DeepSpeed's config from `cfg` (`build_deepspeed_config`),
    `deepspeed.initialize`, then the one-process rule (no all-reduce with itself) and the multi-tensor bf16 step."""
    import deepspeed

    ds_config = build_deepspeed_config(cfg, world_size, keep_zero_stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)
    skip_single_rank_allreduce(engine, world_size)
    use_foreach_bf16_step(engine)
    return engine, mmpt_grad_clip(cfg, ds_config)
