"""The model protocol every architecture implements; the trainer knows models only through it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from mmpt.data.batch import Batch


@dataclass
class ModelOutput:
    """losses: unweighted per-objective scalars (the trainer applies `loss.weights`); metrics: detached."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class PretrainModel(Protocol):
    """Optional extras the engine uses when present: `after_optimizer_step(step)` (called after every
    optimizer step, outside forward: momentum teachers, schedules kept in buffers), `itm_score(images,
    input_ids, attention_mask)` (retrieval re-ranking), `generate(images, ...)` (captioning eval)."""

    objectives: tuple[str, ...]
    default_loss_weights: dict[str, float]

    def forward(self, batch: Batch) -> ModelOutput: ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def flops_per_sample(self) -> float: ...
