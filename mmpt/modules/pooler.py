"""Attentional pooling: a fixed number of learned queries summarise a variable-length token sequence."""
from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from mmpt.modules.attention import CrossAttention
from mmpt.modules.block import init_weights_


class AttentionalPooler(nn.Module):
    """Image tokens `b m c` -> `b q d`: q learned queries cross-attend to the tokens, then LayerNorm.

    CoCa pools this way instead of taking [CLS]: one query gives the contrastive embedding, N queries give
    the decoder a fixed-size image summary (one pooler with 1 + N queries, or two poolers). The queries are
    the parameter `cls_token` (`q d`): they are learned [CLS]-like input tokens, so the project's naming rule
    gives them the token init and keeps them out of weight decay (decay would shrink them towards uniform,
    i.e. mean, pooling). The context is expected normalised already, as tower outputs are.
    `query_norm=True` adds a LayerNorm on the queries before attending (open_clip's `ln_q`; CoCa's
    `layout=open_clip` uses it to match open_clip's pooler parameter for parameter).
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_queries: int,
        num_heads: int,
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        query_norm: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_queries = num_queries
        self.cls_token = nn.Parameter(torch.zeros(num_queries, dim))
        self.query_norm: nn.LayerNorm | None = nn.LayerNorm(dim, eps=norm_eps) if query_norm else None
        self.attn = CrossAttention(dim, num_heads, context_dim, qkv_bias=qkv_bias)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        init_weights_(self)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """context: `b m c`; context_mask: `b m` (1 = keep; padded tokens get zero weight) -> `b q d`."""
        queries = self.cls_token if self.query_norm is None else self.query_norm(self.cls_token)
        queries = repeat(queries, "q d -> b q d", b=context.shape[0])
        return self.norm(self.attn(queries, context, context_mask))

    def flops_per_sample(self, context_tokens: int) -> float:
        """Training FLOPs for one sequence of m = `context_tokens`: q/out projections on the q queries, kv on
        the m tokens (6 per weight and token), and 12 * q * m * d for scores and weighted values."""
        a, q, m = self.attn, self.num_queries, context_tokens
        per_query = a.q.weight.numel() + a.proj.weight.numel()
        return 6.0 * (per_query * q + a.kv.weight.numel() * m) + 12.0 * q * m * self.dim
