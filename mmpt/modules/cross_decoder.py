"""A causal decoder with TWO residual blocks per layer, a self-attention `Block` then a cross-attention-only
`CrossBlock`, each with its own FFN: open_clip's CoCa `MultimodalTransformer` layout.

mmpt's own decoder layer (`Block(cross_attention=True)`) is one block: self-attention, cross-attention and
ONE FFN. open_clip's has two FFNs per layer and a LayerNorm on the context in every cross block, so it has
more parameters and FLOPs at the same width and depth; this module exists so that a CoCa benchmark against
open_clip (scripts/bench/bench_vs_peers.py) compares equal models (CoCa `layout=open_clip`).
"""
from __future__ import annotations

import torch
from torch import nn

from mmpt.modules.attention import CrossAttention, make_attn_mask
from mmpt.modules.block import Block, init_weights_
from mmpt.modules.kv_cache import KVCache, TransformerCache
from mmpt.modules.mlp import Mlp


class CrossBlock(nn.Module):
    """`b n d` queries, `b m c` context -> `b n d`: x + cross_attn(norm_q(x), norm_kv(ctx)); x + ffn(norm2(x))."""

    def __init__(
        self, dim: int, num_heads: int, context_dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
        attn_dropout: float = 0.0, norm_eps: float = 1e-5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_kv = nn.LayerNorm(context_dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads, context_dim, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_ratio=mlp_ratio, dropout=dropout)
        init_weights_(self)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        """context may be None once `cache` holds its keys/values (decoding steps after the first)."""
        ctx = self.norm_kv(context) if context is not None else None
        x = x + self.cross_attn(self.norm_q(x), ctx, cache=cache)
        return x + self.mlp(self.norm2(x))


class SelfCrossDecoder(nn.Module):
    """`layers` x (causal self-attention `Block`, `CrossBlock`), `b n d -> b n d` (no final norm).

    Same call as a cross-attention `Transformer` (`x, is_causal, context, cache`), so CoCa uses either.
    The cache is a `TransformerCache` with one `LayerCache` per layer: the Block's history in `self_attn`,
    the context's keys/values in `cross_attn`.
    """

    def __init__(
        self, width: int, layers: int, heads: int, context_dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
        attn_dropout: float = 0.0, norm_eps: float = 1e-5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.width = width
        common = dict(mlp_ratio=mlp_ratio, dropout=dropout, attn_dropout=attn_dropout, norm_eps=norm_eps)
        self.blocks = nn.ModuleList(Block(width, heads, **common) for _ in range(layers))
        self.cross_blocks = nn.ModuleList(CrossBlock(width, heads, context_dim, **common) for _ in range(layers))

    def new_cache(self) -> TransformerCache:
        return TransformerCache.empty(len(self.blocks))

    def forward(
        self,
        x: torch.Tensor,
        is_causal: bool = True,
        context: torch.Tensor | None = None,
        cache: TransformerCache | None = None,
    ) -> torch.Tensor:
        """x `b n d` (with a cache: only the new tokens); context `b m c` (None after the first cached step)."""
        n, past = x.shape[1], cache.length if cache is not None else 0
        mask = make_attn_mask(n, past + n, is_causal=is_causal, dtype=x.dtype, device=x.device)
        causal_only = is_causal and mask is None and past == 0  # SDPA's own causal flag (flash path)
        for i, (block, cross) in enumerate(zip(self.blocks, self.cross_blocks)):
            layer = cache.layers[i] if cache is not None else None
            x = block(x, attn_mask=mask, is_causal=causal_only, cache=layer)
            x = cross(x, context, cache=layer.cross_attn if layer is not None else None)
        return x

    def flops(self, num_tokens: int, context_tokens: int) -> float:
        """Training FLOPs for n = `num_tokens` tokens cross-attending to m = `context_tokens`: 6 * weights *
        tokens (the cross kv projections per context token) + 12 * n * (n + m) * d per layer for the scores."""
        n, m = num_tokens, context_tokens
        linear = sum(mod.weight.numel() for mod in self.modules() if isinstance(mod, nn.Linear))
        kv = sum(c.cross_attn.kv.weight.numel() for c in self.cross_blocks)
        return 6.0 * ((linear - kv) * n + kv * m) + 12.0 * len(self.blocks) * n * (n + m) * self.width
