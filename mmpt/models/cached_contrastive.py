"""The `grad_cache` capability: a contrastive loss split into per-pair features and a loss over all of them.

Contrastive gradient caching (mmpt/engine/grad_cache.py) needs the loss to be a function of the L2-normalised
per-pair embeddings alone, so it can embed many micro-batches without a graph, take the loss gradient w.r.t.
those embeddings, and back-propagate it micro-batch by micro-batch. A model offers it with two methods:

    contrastive_features(batch) -> (image_features `b e`, text_features `b e`)   # with graph when grad is on
    contrastive_loss(image_features, text_features, batch) -> ModelOutput         # losses keyed by objective

`batch` of `contrastive_loss` holds the rows' ids and captions (duplicate-caption / same-image codes), in the
features' row order; its images may be absent. Any loss module with ContrastiveLoss's call signature
`(image_features, text_features, codes) -> (loss, metrics)` plugs in through `contrastive_losses()` (a new
contrastive objective: its name in `protocol.CONTRASTIVE_OBJECTIVES` and its module as `self.<name>` or `self.itc`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mmpt.data.batch import Batch
from mmpt.models.protocol import CONTRASTIVE_OBJECTIVES, ModelOutput
from mmpt.objectives.pair_codes import itc_codes


def grad_cache_capability(objectives: Iterable[str], momentum_teacher: bool = False) -> frozenset[str]:
    """{"grad_cache"} when every configured objective is contrastive and no EMA teacher / queue is involved
    (a queue enqueues per forward and a teacher's targets are not per-pair features of the student)."""
    names = list(objectives)
    cacheable = bool(names) and set(names) <= set(CONTRASTIVE_OBJECTIVES) and not momentum_teacher
    return frozenset({"grad_cache"}) if cacheable else frozenset()


class CachedContrastive:
    """Mixin for models whose contrastive embeddings are `encode_image` / `encode_text` and whose loss module
    is `self.itc`; the model sets `capabilities` (with `grad_cache_capability`), `objectives` and `config`."""

    capabilities: frozenset[str]
    objectives: tuple[str, ...]
    itc: nn.Module

    def contrastive_losses(self) -> dict[str, nn.Module]:
        """Configured contrastive objective -> its loss module: the model's attribute of that name (e.g.
        `self.siglip`) where it has one, else its contrastive head `self.itc` (built for whichever loss is set)."""
        return {name: getattr(self, name, self.itc) for name in self.objectives if name in CONTRASTIVE_OBJECTIVES}

    def _require_grad_cache(self) -> None:
        if "grad_cache" not in self.capabilities:
            raise ValueError(
                f"contrastive features/loss need contrastive-only objectives (one of {list(CONTRASTIVE_OBJECTIVES)}) "
                f"and no momentum teacher; this model has objectives={list(self.objectives)}"
            )

    def contrastive_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs -> (image, text) L2-normalised `b e` embeddings, exactly those forward feeds the loss."""
        self._require_grad_cache()
        assert batch.images is not None and batch.input_ids is not None and batch.attention_mask is not None
        return self.encode_image(batch.images), self.encode_text(batch.input_ids, batch.attention_mask)  # type: ignore[attr-defined]

    def contrastive_loss(self, image_features: torch.Tensor, text_features: torch.Tensor, batch: Batch) -> ModelOutput:
        """The configured contrastive losses over rows of features (local rows; the loss gathers across ranks)."""
        self._require_grad_cache()
        assert batch.input_ids is not None and batch.attention_mask is not None
        codes = itc_codes(self.config.contrastive.duplicate_positives, batch.image_ids,  # type: ignore[attr-defined]
                          batch.input_ids, batch.attention_mask)
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        for name, module in self.contrastive_losses().items():
            losses[name], m = module(image_features, text_features, codes)
            metrics.update(m)
        return ModelOutput(losses=losses, metrics=metrics)
