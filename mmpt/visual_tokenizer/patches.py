"""Pixel-space patch features shared by the k-means codebook and the `pixels` regression targets.

Both work on [0, 1] RGB pixels rather than on the data-normalised tensor, so a codebook does not depend on
which mean/std the data pipeline happens to use: the tokenizer undoes the data normalisation first.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the data pipeline's default (mmpt.data.transforms)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def channel_stats(values: Sequence[float], name: str) -> torch.Tensor:
    """3 per-channel values -> `c 1 1` float32, broadcastable over `b c h w`."""
    values = [float(v) for v in values]
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        kind = "positive numbers" if name == "std" else "numbers"
        raise ValueError(f"visual tokenizer {name} must be 3 {kind}, got {values}")
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def unnormalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Data-normalised `b c h w` -> [0, 1] pixels `b c h w` in float32 (inverse of the pipeline's Normalize)."""
    return images.float() * std + mean


def normalized_patches(pixels: torch.Tensor, patch_size: int, eps: float) -> torch.Tensor:
    """`b c (gh p1) (gw p2)` -> `b (gh gw) (p1 p2 c)`, each patch shifted to mean 0 and divided by (std + eps).

    Per-patch statistics over all p*p*c values (population std), as the normalised pixel targets of MAE and
    BEiT. Removing each patch's brightness and contrast leaves its shape/texture, which is what a masked
    patch should be predicted from its context; eps keeps near-flat patches (a plain background with
    compression noise) near zero instead of blowing their noise up to full contrast.
    """
    x = rearrange(pixels.float(), "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=patch_size, p2=patch_size)
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)
