"""The transformer feed-forward network, its own module so Multiway/MoME blocks can swap experts in."""
from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """`b n d -> b n d`: Linear(d, r*d) -> GELU -> dropout -> Linear(r*d, d) -> dropout.

    Kept free of normalisation so that a block decides where the norm goes (pre-LN here; VLMo experts
    carry their own LayerNorm and wrap this). Weights are initialised by the owning `Block`.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden = hidden_dim if hidden_dim is not None else int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
