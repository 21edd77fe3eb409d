"""Multi-head self-attention on `F.scaled_dot_product_attention` (flash / memory-efficient kernels).

Masks follow SDPA's boolean convention everywhere in mmpt: True / 1 = "may attend". A key padding mask is
the batch's `attention_mask` (`b l`, 1 = real token) as it comes out of the collator, so no caller ever
flips or converts it. `make_attn_mask` is public so cross-attention (ALBEF/BLIP fusion, CoCa decoder)
builds its masks the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def make_attn_mask(
    q_len: int,
    k_len: int,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Merge the mask kinds into one tensor broadcastable to `b h q k`, or None if none is needed.

    key_padding_mask: `b k`, bool or 0/1 ints, 1 = keep (padded keys get exactly zero weight).
    attn_mask: bool (True = keep) or additive float, broadcastable to `b h q k`.
    is_causal: query i attends keys j <= i (top-left aligned, like SDPA's own `is_causal`).

    A lone causal mask returns None: the caller passes `is_causal=True` to SDPA instead, which keeps the
    flash kernel (an explicit mask tensor disables it). Fully masked query rows produce zeros in SDPA,
    not NaN, but with right padding and [CLS] first this never happens for real tokens anyway.
    """
    masks: list[torch.Tensor] = []
    if key_padding_mask is not None:
        masks.append(rearrange(key_padding_mask.bool(), "b k -> b 1 1 k"))
    if is_causal and (masks or attn_mask is not None):
        masks.append(torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril())
    if attn_mask is not None:
        masks.append(attn_mask)
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        merged = masks[0]
        for m in masks[1:]:
            merged = merged & m
        return merged
    # At least one additive mask: turn booleans into 0 / -inf and add (SDPA adds a float mask to scores).
    merged_f: torch.Tensor | None = None
    for m in masks:
        add = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)
        merged_f = add if merged_f is None else merged_f + add
    return merged_f


class Attention(nn.Module):
    """Self-attention with a fused qkv projection: `b n d -> b n d`.

    One `d -> 3d` matmul instead of three keeps the GEMM large (better utilisation) and gives a single
    weight to shard / load. Weights are initialised by the owning `Block` (see `init_weights_`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x: `b n d`; key_padding_mask: `b n` (1 = keep); attn_mask: broadcastable to `b h n n`."""
        n = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        mask = make_attn_mask(n, n, key_padding_mask, attn_mask, is_causal, dtype=q.dtype, device=x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
