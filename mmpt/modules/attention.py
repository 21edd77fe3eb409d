"""Multi-head self- and cross-attention on `F.scaled_dot_product_attention` (flash / memory-efficient kernels).

Masks follow SDPA's boolean convention everywhere in mmpt: True / 1 = "may attend". A key padding mask is
the batch's `attention_mask` (`b l`, 1 = real token) as it comes out of the collator, so no caller ever
flips or converts it. Self-attention (towers, decoders) and cross-attention (ALBEF/BLIP fusion, CoCa
decoder, attentional pooler) build their masks with the same `make_attn_mask` and run the same `attend`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmpt.modules.kv_cache import KVCache

# On CPU, torch's flash-attention kernel runs bf16 / fp16 slower than fp32 over short key sequences (1.5-3.5x up
# to 128 keys, 1.0-1.7x at 197-257), and two bf16 matrix multiplies around a softmax beat both (AMX does the
# products): 0.98-1.07x the fp32 kernel at 17 keys, 1.27-1.87x at 32-197, 1.8-1.9x at 257 (fwd + bwd, torch 2.13,
# 1 thread, heads of 32 and 64 channels; scripts/bench/bench_cpu_attention.py, docs/PERFORMANCE.md "bf16 on CPU").
# Up to this many keys mmpt takes the products for bf16 and the fp32 kernel for fp16 (CPUs lack fast fp16
# products); longer sequences keep the kernel, whose memory does not grow with the `n x n` scores.
CPU_ATTENTION_MAX_KEYS = 256


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
    is_causal: the queries are the last `q_len` positions of the `k_len` keys and each attends only keys at
    or before its own position (bottom-right aligned). For q_len == k_len this is SDPA's own `is_causal`;
    for q_len < k_len it is what a decoding step with a KV cache needs (new tokens see the whole cache).

    A lone square causal mask returns None: the caller passes `is_causal=True` to SDPA instead (see
    `attend`), which keeps the flash kernel (an explicit mask tensor disables it). A single causal query
    needs no mask at all. Fully masked query rows produce zeros in SDPA, not NaN, but with right padding
    and [CLS] first this never happens for real tokens anyway.
    """
    masks: list[torch.Tensor] = []
    if key_padding_mask is not None:
        masks.append(rearrange(key_padding_mask.bool(), "b k -> b 1 1 k"))
    if is_causal and q_len > 1 and (masks or attn_mask is not None or q_len != k_len):
        masks.append(torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len))
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


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for `b h n d` queries and `b h m d` keys/values -> `b n (h d)`.

    `mask` comes from `make_attn_mask` called with the same `is_causal`: SDPA's own causal flag is only used
    when that returned None for a square problem (SDPA aligns a non-square causal mask top-left, which is
    wrong for cached decoding).
    """
    sdpa_causal = is_causal and mask is None and q.shape[-2] == k.shape[-2]
    path = cpu_attention_path(q, k)
    if path == "matmul":
        return matmul_attention(q, k, v, mask, sdpa_causal, dropout_p)
    dtype = q.dtype
    if path == "fp32":
        q, k, v = q.float(), k.float(), v.float()
        mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=sdpa_causal)
    return rearrange(out.to(dtype), "b h n d -> b n (h d)")


def cpu_attention_path(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """How low-precision attention runs on CPU, where torch's bf16 / fp16 kernel is slow over short key
    sequences (see CPU_ATTENTION_MAX_KEYS): "matmul" (bf16: `matmul_attention`), "fp32" (fp16: the kernel on fp32
    upcasts; the projections around it stay in fp16), or None: SDPA as called. GPUs always get None."""
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    if q.device.type != "cpu" or not low_precision or k.shape[-2] > CPU_ATTENTION_MAX_KEYS:
        return None
    return "matmul" if q.dtype == torch.bfloat16 else "fp32"


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     is_causal: bool, dropout_p: float) -> torch.Tensor:
    """`attend` as two batched products in q's dtype around a softmax that accumulates in fp32: scores and
    probabilities are rounded to bf16, as in autocast attention. The scale and the mask go into the first product
    (`baddbmm`: scale * q k^T + additive mask, one op); fully masked query rows give zeros, as SDPA's do."""
    b, h, n, d = q.shape
    m = k.shape[-2]
    if is_causal:
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
    bias, beta = q.new_zeros(1, 1, 1), 0.0  # beta 0: no mask, the bias is never read
    if mask is not None:
        beta = 1.0
        # a finite lowest value, not -inf: a fully masked row then stays finite through backward (its output is
        # zeroed below), while exp(lowest - max) is still exactly 0 in every other row
        bias = mask.to(q.dtype) if mask.dtype != torch.bool else (
            torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min))
        bias = _per_batch_head(bias, b, h)
    scores = torch.baddbmm(bias, q.reshape(b * h, n, d), k.reshape(b * h, m, d).transpose(1, 2), beta=beta,
                           alpha=d ** -0.5)  # (b h) n m
    # softmax straight to q's dtype: the CPU kernel accumulates in fp32, and its bf16 output is what the second
    # product reads anyway (an fp32 softmax and its cast copy `b h n m` twice: 13-26% slower here)
    probs = F.softmax(scores, dim=-1).view(b, h, n, m)
    if mask is not None and mask.dtype == torch.bool:
        dead = ~mask.any(dim=-1, keepdim=True)  # query rows that may attend to nothing
        if bool(dead.any()):  # a host check, free on CPU
            probs = probs.masked_fill(dead, 0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.bmm(probs.reshape(b * h, n, m), v.reshape(b * h, m, d))
    return rearrange(out, "(b h) n d -> b n (h d)", b=b)


def _per_batch_head(bias: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """An additive mask broadcastable to `b h q m` -> broadcastable to `(b h) q m` (q may be 1): one shared by
    every sample and head stays a view; otherwise it is expanded over `b h` (`b h` rows of its size)."""
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    if bias.shape[0] == 1 and bias.shape[1] == 1:
        return bias[0]
    return bias.expand(b, h, *bias.shape[2:]).reshape(b * h, *bias.shape[2:])


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
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: `b n d`; key_padding_mask: `b k` (1 = keep); attn_mask: broadcastable to `b h n k`.

        Without a cache k = n. With one, x holds only the new tokens, their keys/values are appended to
        the cache, k = cached + n, and both masks cover all k keys (causal is bottom-right aligned).
        """
        n = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if cache is not None:
            k, v = cache.append(k, v)
        k_len = k.shape[-2]
        mask = make_attn_mask(n, k_len, key_padding_mask, attn_mask, is_causal, dtype=q.dtype, device=x.device)
        out = attend(q, k, v, mask, is_causal, self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    """Queries from x `b n d` attend to a context `b m c`: `-> b n d`.

    Separate q (`d -> d`) and kv (`c -> 2d`) projections, because the context is another sequence, often of
    another width (ViT tokens feeding a text decoder). With a cache, the context's k/v are computed on the
    first decoding step and reused, since the context does not change while generating.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.context_dim = context_dim if context_dim is not None else dim
        self.attn_dropout = attn_dropout
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(self.context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: `b n d`; context: `b m c` (may be None once `cache` holds its k/v); context_mask: `b m` (1 = keep).

        A filled cache wins over `context` (the context is fixed for the life of a cache).
        """
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        if cache is not None and cache.k is not None and cache.v is not None:
            k, v = cache.k, cache.v
        else:
            if context is None:
                raise ValueError("cross-attention needs a context (or a cache already holding its keys/values)")
            k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
            if cache is not None:
                cache.k, cache.v = k, v
        mask = make_attn_mask(x.shape[1], k.shape[-2], context_mask, dtype=q.dtype, device=x.device)
        out = attend(q, k, v, mask, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out))
