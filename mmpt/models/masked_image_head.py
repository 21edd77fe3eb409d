"""Masked image modeling head shared by VLMo (stage 1) and BEiT-3 (masked data modeling).

The model owns a frozen visual tokenizer (so `.to(device)`, checkpoints and `model.init.checkpoint` carry it)
and a linear head from the encoder's patch outputs to the tokenizer's targets: codebook logits (BEiT) or
per-patch normalised pixels (the tokenizer-free alternative). The tokenizer always sees the UNMASKED
images: the targets are what the hidden patches really contain.
"""
from __future__ import annotations

import torch
from torch import nn

from mmpt.objectives.mim import mim_loss
from mmpt.visual_tokenizer import VisualTokenizerConfig, build_visual_tokenizer


class MaskedImageHead(nn.Module):
    """`forward(patch_tokens b n d, images b c h w, image_mask b n) -> (loss, metrics)`."""

    def __init__(self, width: int, tokenizer: VisualTokenizerConfig) -> None:
        super().__init__()
        self.tokenizer = build_visual_tokenizer(tokenizer)
        self.head = nn.Linear(width, self.tokenizer.target_dim)

    def forward(
        self, patch_tokens: torch.Tensor, images: torch.Tensor, image_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            target = self.tokenizer.encode(images)  # `b n` ids or `b n k` floats
        return mim_loss(self.head(patch_tokens), target, image_mask)

    def flops(self, num_patches: int) -> float:
        """Training FLOPs per sample of the linear head over every patch (forward + backward)."""
        return 6.0 * self.head.weight.numel() * num_patches
