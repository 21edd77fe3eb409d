"""The transformer feed-forward network, its own module so Multiway/MoME blocks can swap experts in."""
from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI CLIP was trained with, so its
    weights (and Hugging Face `hidden_act="quick_gelu"`) need it to reproduce their outputs exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """`b n d -> b n d`: Linear(d, r*d) -> GELU -> dropout -> [LayerNorm(r*d)] -> Linear(r*d, d) -> dropout.

    Kept free of the input normalisation so that a block decides where the norm goes (pre-LN here; VLMo
    experts carry their own LayerNorm and wrap this). `inner_norm=True` adds the Sub-LN (MAGNETO) LayerNorm
    on the hidden activations that the released BEiT-3 (torchscale, `subln=True`) uses; it keeps the
    activation scale in check in deep stacks. Weights are initialised by the owning `Block`.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        inner_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        hidden = hidden_dim if hidden_dim is not None else int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(dropout)
        self.norm: nn.LayerNorm | None = nn.LayerNorm(hidden, eps=norm_eps) if inner_norm else None
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop1(self.act(self.fc1(x)))
        if self.norm is not None:
            h = self.norm(h)
        return self.drop2(self.fc2(h))
