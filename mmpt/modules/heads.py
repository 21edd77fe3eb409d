"""Heads on top of pooled tower outputs: projection into the shared embedding space, L2 normalisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.modules.block import init_weights_


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """Unit-norm along `dim`, so that a dot product is a cosine similarity (the ITC logits' bound).

    eps is large enough to stay representable in bf16/fp16 (F.normalize's 1e-12 underflows in fp16).
    """
    return F.normalize(x, dim=dim, eps=eps)


class ProjectionHead(nn.Module):
    """`b d -> b e`: a Linear into the shared embedding space, bias-free by default as in OpenAI CLIP."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def flops_per_sample(self) -> float:
        """Training FLOPs for one pooled vector: 6 * weights."""
        return 6.0 * self.proj.weight.numel()
