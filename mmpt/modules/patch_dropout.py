"""Patch dropout (FLIP, Li et al. 2023): train the image encoder on a random subset of its patch tokens.

Applied after position embeddings, so every kept token still knows where it came from, and before the first
block, so every block (and whatever reads the image tokens: poolers, cross-attention, fused text) runs on
`prefix + k` tokens instead of `prefix + n`. With p = 0.5 the encoder does about half the work per image.

Every sample keeps the same number of patches, k = round((1 - p) * n) (at least 1), so the batch stays one
dense `b (prefix + k) d` tensor (a gather with one index row per sample, no padding or masks). The leading
`prefix` tokens ([CLS]) are always kept. Only in training mode: eval, retrieval and generation see every patch.

The subset is drawn with the torch RNG of the tokens' device (`torch.rand`), so anything that replays the RNG
state to re-run a forward (gradient caching, recomputation) draws the same subset again.
"""
from __future__ import annotations

import torch
from einops import repeat
from torch import nn


def kept_patches(num_patches: int, p: float) -> int:
    """How many of `num_patches` patch tokens a training forward keeps at drop rate `p` (round half to even)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"patch dropout p={p} must be in [0, 1)")
    return max(1, round((1.0 - p) * num_patches)) if p > 0 else num_patches


class PatchDropout(nn.Module):
    """`b (prefix + n) d` -> `b (prefix + k) d` in training (k = `kept_patches(n, p)`); identity in eval or at p = 0.

    Kept patches stay in their original order (sorted indices): attention does not care, but it keeps a
    subset easy to read and compare.
    """

    def __init__(self, p: float = 0.0, prefix_tokens: int = 1) -> None:
        super().__init__()
        kept_patches(1, p)  # validates p
        self.p = p
        self.prefix_tokens = prefix_tokens

    def active(self) -> bool:
        return self.training and self.p > 0

    def num_kept(self, num_patches: int) -> int:
        """Patch tokens a forward in the current mode keeps."""
        return kept_patches(num_patches, self.p) if self.active() else num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return x
        prefix, patches = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        b, n, d = patches.shape
        k = kept_patches(n, self.p)
        keep = torch.rand(b, n, device=x.device).topk(k, dim=1).indices.sort(dim=1).values  # `b k`
        kept = torch.gather(patches, 1, repeat(keep, "b k -> b k d", d=d))
        return torch.cat([prefix, kept], dim=1)

    def extra_repr(self) -> str:
        return f"p={self.p}, prefix_tokens={self.prefix_tokens}"
