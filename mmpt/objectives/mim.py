"""Masked image modeling loss: predict the targets of masked patches only (BEiT / BEiT-3 / VLMo stage 1).

Targets come from a visual tokenizer (mmpt.visual_tokenizer): integer ids -> cross-entropy over the codebook
(BEiT), float vectors -> MSE on normalised pixels (MAE-style). The loss runs over all `b n` positions and
zeroes the unmasked ones instead of gathering the masked ones, because boolean indexing would make the host
wait for the mask count every step.
"""
from __future__ import annotations

import torch

from mmpt.objectives.mlm import IGNORE_INDEX, mlm_loss


def mim_loss(
    pred: torch.Tensor, target: torch.Tensor, image_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over masked patches -> (loss, metrics), metrics detached.

    pred `b n v` logits with target `b n` int ids: cross-entropy (fp32 log-softmax), metrics {"mim_acc"}.
    pred `b n k` with target `b n k` floats: squared error averaged over k, then over masked patches
    (MAE's per-patch mean), no metrics. image_mask `b n`: True (or 1) where a patch was masked.
    A batch with no masked patch gives loss 0 that still has a graph (no NaN, backward works).
    """
    if image_mask.shape != pred.shape[:2] or pred.ndim != 3:
        raise ValueError(
            f"mim_loss: pred must be `b n v|k` and image_mask `b n` with the same b n; got pred "
            f"{tuple(pred.shape)}, image_mask {tuple(image_mask.shape)}"
        )
    masked = image_mask.bool()
    if not target.is_floating_point():
        if target.shape != pred.shape[:2]:
            raise ValueError(
                f"mim_loss: integer targets (token ids) must be `b n` = {tuple(pred.shape[:2])}, got "
                f"{tuple(target.shape)}; float targets `b n k` select the MSE (pixel) loss"
            )
        labels = torch.where(masked, target.long(), torch.full_like(target, IGNORE_INDEX, dtype=torch.long))
        loss, metrics = mlm_loss(pred, labels)  # same masked-position CE as MLM: one implementation
        return loss, {"mim_acc": metrics["mlm_acc"]}
    if target.shape != pred.shape:
        raise ValueError(
            f"mim_loss: float targets must match pred `b n k` = {tuple(pred.shape)}, got {tuple(target.shape)}; "
            "pass token ids (int64 `b n`) for the cross-entropy loss"
        )
    per_patch = (pred.float() - target.float().detach()).pow(2).mean(dim=-1)  # `b n`
    count = masked.sum().clamp(min=1)
    loss = torch.where(masked, per_patch, 0.0).sum() / count
    return loss, {}
