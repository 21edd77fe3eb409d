"""The model protocol every architecture implements; the engine and eval know models only through it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from mmpt.data.batch import KINDS, Batch, MixedBatch

# Optional methods a model may offer; `capabilities` says which this instance has (ALBEF without `itm` in its
# objectives builds no ITM head, so it cannot re-rank). "grad_cache": `contrastive_features(batch)` and
# `contrastive_loss(image_features, text_features, batch)` (mmpt/models/cached_contrastive.py), which
# `trainer.contrastive_accum_steps` needs.
CAPABILITIES = ("itm_score", "generate", "grad_cache")
# Objectives whose loss is a function of the per-pair image/text embeddings alone: the ones gradient caching can
# split into an embedding pass and a loss over all embeddings.
CONTRASTIVE_OBJECTIVES = ("itc", "siglip")
# Objective -> the data kinds it reads, for every architecture (a model's `data_kinds` is the union over its
# configured objectives).
OBJECTIVE_KINDS: dict[str, tuple[str, ...]] = {
    "itc": ("pairs",), "itm": ("pairs",), "mlm": ("pairs", "texts"), "mim": ("images",), "caption": ("pairs",),
    "mdm_text": ("texts", "pairs"), "mdm_image": ("images", "pairs"),
}  # fmt: skip


@dataclass
class ModelOutput:
    """losses: unweighted per-objective scalars (the trainer applies `loss.weights`); metrics: detached."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class PretrainModel(Protocol):
    """What the trainer and evaluation call. `objectives`: the configured objectives (forward returns exactly
    these losses for data of every kind it reads); `data_kinds`: the kinds of sample it trains on;
    `capabilities`: the optional methods of CAPABILITIES it offers — `itm_score(images, input_ids,
    attention_mask)` (retrieval re-ranking), `generate(images, ...)` (captioning eval), `grad_cache`
    (`contrastive_features` + `contrastive_loss`: contrastive gradient caching). Optional hook:
    `after_optimizer_step(step)` (called after every optimizer step, outside forward: momentum teachers,
    schedules kept in buffers)."""

    objectives: tuple[str, ...]
    data_kinds: tuple[str, ...]
    capabilities: frozenset[str]
    default_loss_weights: dict[str, float]

    def forward(self, batch: Batch | MixedBatch) -> ModelOutput: ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def flops_per_sample(self, kind: str = "pairs", batch_size: int = 1) -> float:
        """Training (forward + backward) FLOPs for one sample of `kind` in a micro-batch holding `batch_size`
        samples of that kind (a cost that depends on the batch, e.g. ALBEF's masked-row capacity, is spread
        over it); text over max_text_len positions. 0 for a kind the objectives do not read."""
        ...


def data_kinds_of(objectives: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The kinds some objective reads, in `mmpt.data.batch.KINDS` order."""
    used = {kind for name in objectives for kind in OBJECTIVE_KINDS[name]}
    return tuple(kind for kind in KINDS if kind in used)


def check_kind(kind: str, data_kinds: tuple[str, ...]) -> bool:
    """For `flops_per_sample`: False for a kind this model does not read; an unknown kind is an error."""
    if kind not in KINDS:
        raise ValueError(f"flops_per_sample: kind={kind!r} must be one of {list(KINDS)}")
    return kind in data_kinds


def has_capability(model: object, name: str) -> bool:
    return name in getattr(model, "capabilities", frozenset())


def step_flops(model: PretrainModel, batch: Batch | MixedBatch) -> float:
    """Training FLOPs of one micro-batch: sum over its kinds of samples x `flops_per_sample`."""
    parts = batch.parts if isinstance(batch, MixedBatch) else {batch.kind: batch}
    return sum(len(part) * model.flops_per_sample(kind, batch_size=len(part)) for kind, part in parts.items())
