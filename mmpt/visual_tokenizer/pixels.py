"""The tokenizer-free alternative (MAE-style): regress each masked patch's per-patch normalised pixels."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mmpt.visual_tokenizer.base import FrozenTokenizer, check_images
from mmpt.visual_tokenizer.patches import CLIP_MEAN, CLIP_STD, channel_stats, normalized_patches, unnormalize


class PixelTokenizer(FrozenTokenizer):
    """Images `b c h w` (data-normalised with mean/std) -> float targets `b n (p p c)`.

    The same feature as the k-means codebook is fitted on, without the quantisation: vocab_size 0,
    target_dim p*p*3, to be trained with MSE (`mim_loss` picks MSE for float targets).
    """

    def __init__(
        self,
        patch_size: int,
        image_size: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        eps: float = 1e-2,
    ) -> None:
        super().__init__()
        if patch_size < 1 or eps < 0:
            raise ValueError(f"pixels tokenizer needs patch_size >= 1 and eps >= 0, got {patch_size}, {eps}")
        self.patch_size, self.image_size, self.eps = patch_size, image_size, eps
        self.vocab_size = 0
        self.target_dim = patch_size * patch_size * 3
        self.register_buffer("mean", channel_stats(mean, "mean"), persistent=False)
        self.register_buffer("std", channel_stats(std, "std"), persistent=False)
        self.freeze_()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.patch_size, self.image_size)
        return normalized_patches(unnormalize(images, self.mean, self.std), self.patch_size, self.eps)
