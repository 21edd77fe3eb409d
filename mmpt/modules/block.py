"""Pre-LN transformer block (post-LN optional, for BERT weights), a stack of them, and the weight-init
recipe shared by every tower."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mmpt.modules.attention import Attention, CrossAttention, make_attn_mask
from mmpt.modules.checkpointing import run_block
from mmpt.modules.kv_cache import LayerCache, TransformerCache
from mmpt.modules.mlp import Mlp

# Parameters that are not weights of a Linear/Conv/Embedding but are still initialised trunc-normal.
TOKEN_PARAM_NAMES = ("pos_embed", "cls_token", "mask_token")

DEFAULT_INIT_STD = 0.02  # ViT/BERT/CLIP's value, made for widths of 512-1024
_init_std = DEFAULT_INIT_STD  # what init_weights_ uses while a model is built (`init_std_scope`)


@contextmanager
def init_std_scope(std: float) -> Iterator[None]:
    """Every `init_weights_` / `trunc_normal_init_` call inside uses `std` (the model config's `init_std`):
    one number reaches every tower's modules without threading it through each constructor."""
    global _init_std
    previous, _init_std = _init_std, std
    try:
        yield
    finally:
        _init_std = previous


def trunc_normal_init_(p: torch.Tensor, std: float | None = None) -> None:
    """In place: trunc-normal(std, +-2 std); std defaults to the current `init_std_scope`."""
    std = _init_std if std is None else std
    nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)


def init_weights_(module: nn.Module, std: float | None = None) -> None:
    """In place: trunc-normal(std, +-2 std) for Linear/Conv/Embedding weights and position/cls tokens,
    zeros for biases, ones/zeros for LayerNorm (BERT/ViT/CLIP-style). A no-op on the meta device.
    std defaults to the current `init_std_scope` (0.02 outside one)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            trunc_normal_init_(m.weight, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in m.named_parameters(recurse=False):
            if name in TOKEN_PARAM_NAMES:
                trunc_normal_init_(p, std)


class Block(nn.Module):
    """Pre-LN block, `b n d -> b n d`: x + attn(ln1(x)); [x + cross_attn(ln(x), context)]; x + ffn(ln2(x)).

    Pre-LN keeps the residual stream un-normalised, so deep stacks train without warm-up tricks; the tower
    applies one final LayerNorm. `mlp` may be injected (e.g. a modality-routed expert FFN); subclasses
    that need extra routing arguments override `ffn`.

    `cross_attention=True` adds a cross-attention branch between self-attention and FFN (ALBEF/BLIP fusion
    layers, CoCa multimodal decoder layers); its context (e.g. image tokens, width `context_dim`, default
    `dim`) is expected to be normalised already, as tower outputs are. Called without a context, such a
    block skips the branch, so one set of layers can also run text-only (BLIP's unimodal text encoder).

    `norm_first=False` gives the post-LN layout of BERT (and so of ALBEF/BLIP's released text towers):
    x = norm1(x + attn(x)); [x = norm_cross(x + cross_attn(x, context))]; x = norm2(x + mlp(x)). Same
    parameters and names, only the order differs, so BERT checkpoints load and reproduce BERT exactly.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
        mlp: nn.Module | None = None,
        cross_attention: bool = False,
        context_dim: int | None = None,
        norm_first: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if context_dim is not None and not cross_attention:
            raise ValueError("context_dim is only meaningful with cross_attention=True")
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.norm_cross: nn.LayerNorm | None = None
        self.cross_attn: CrossAttention | None = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_attn = CrossAttention(
                dim, num_heads, context_dim, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout
            )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp if mlp is not None else Mlp(dim, mlp_ratio=mlp_ratio, dropout=dropout, act_layer=act_layer)
        init_weights_(self)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch after attention: `b n d -> b n d` (pre-LN: includes norm2; post-LN: the
        caller normalises the residual sum instead)."""
        return self.mlp(self.norm2(x) if self.norm_first else x)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: `b n d`; key_padding_mask: `b k` (1 = keep); attn_mask: broadcastable to `b h n k`;
        context: `b m c`; context_mask: `b m` (1 = keep). Without a cache k = n; with one x holds only the
        new tokens and the self-attention masks cover all k = cached + n keys (see `Attention`)."""
        pre = self.norm_first
        h = self.attn(
            self.norm1(x) if pre else x,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            cache=cache.self_attn if cache is not None else None,
        )
        x = x + h if pre else self.norm1(x + h)
        if self.cross_attn is not None and self.norm_cross is not None:
            cross_cache = cache.cross_attn if cache is not None else None
            if context is not None or (cross_cache is not None and cross_cache.k is not None):
                h = self.cross_attn(self.norm_cross(x) if pre else x, context, context_mask, cache=cross_cache)
                x = x + h if pre else self.norm_cross(x + h)
        elif context is not None:
            raise ValueError("this block has no cross-attention: build it with cross_attention=True to use a context")
        return x + self.ffn(x) if pre else self.norm2(x + self.ffn(x))


class Transformer(nn.Module):
    """A stack of `Block`s, `b n d -> b n d` (no final norm: the tower owns it).

    With `cross_attention=True` every block cross-attends to the context passed to `forward` (a stack that
    mixes text-only and fusion layers is two stacks, as ALBEF's text encoder + fusion encoder are).
    `norm_first=False` makes every block post-LN (BERT layout, see `Block`); `act_layer` is the FFN activation
    (`mmpt.modules.mlp.QuickGELU` for OpenAI CLIP weights). The first `checkpoint_blocks` blocks run under
    activation checkpointing in training (mmpt/modules/checkpointing.py; never with a cache).
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
        cross_attention: bool = False,
        context_dim: int | None = None,
        norm_first: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.width = width
        self.cross_attention = cross_attention
        self.norm_first = norm_first
        self.checkpoint_blocks = 0  # `model.activation_checkpointing`, set by set_activation_checkpointing
        self.blocks = nn.ModuleList(
            Block(
                width,
                heads,
                mlp_ratio,
                qkv_bias,
                dropout,
                attn_dropout,
                norm_eps,
                cross_attention=cross_attention,
                context_dim=context_dim,
                norm_first=norm_first,
                act_layer=act_layer,
            )
            for _ in range(layers)
        )

    def new_cache(self) -> TransformerCache:
        """An empty cache for incremental decoding with `forward(..., cache=...)`."""
        return TransformerCache.empty(len(self.blocks))

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: TransformerCache | None = None,
    ) -> torch.Tensor:
        """Masks as in `Block`; they are merged once here instead of once per layer.

        Incremental decoding: pass `cache=self.new_cache()` and the prompt on the first call, then only the
        new token(s) `b n d` (embedded at positions `cache.length` onwards). key_padding_mask `b k` and
        attn_mask `.. n k` then cover all k = cache.length + n keys, and `is_causal=True` lets new tokens
        see the whole cache and each other causally: the result equals the matching rows of a full forward.
        The context's k/v are cached on the first call; later calls may pass context=None.
        """
        n = x.shape[1]
        past = 0
        if cache is not None:
            if len(cache.layers) != len(self.blocks):
                raise ValueError(f"cache has {len(cache.layers)} layers, the stack has {len(self.blocks)}")
            past = cache.length
        mask = make_attn_mask(n, past + n, key_padding_mask, attn_mask, is_causal, dtype=x.dtype, device=x.device)
        causal_only = is_causal and mask is None and past == 0  # keeps SDPA's flash path for pure causal masking
        checkpointed = self.checkpoint_blocks if cache is None else 0
        for i, block in enumerate(self.blocks):
            x = run_block(
                block,
                i < checkpointed,
                x,
                attn_mask=mask,
                is_causal=causal_only,
                context=context,
                context_mask=context_mask,
                cache=cache.layers[i] if cache is not None else None,
            )
        return x

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token (all Linear weights; norms and biases excluded)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def context_params(self) -> int:
        """The part of `matmul_params` applied per context token (cross-attention kv projections)."""
        return sum(b.cross_attn.kv.weight.numel() for b in self.blocks if b.cross_attn is not None)

    def flops(self, num_tokens: int, context_tokens: int | None = None) -> float:
        """Training (forward + backward) FLOPs for one sequence of `num_tokens` tokens.

        6 * P * n for the weight matmuls (2 per multiply-add forward, x3 for backward's two matmuls) plus
        12 * L * n^2 * d for attention scores QK^T and weights @ V (each 2 n^2 d forward, x3 with backward).
        Causal masking is counted in full, as is conventional (PaLM / nanoGPT MFU). With cross-attention
        the kv projections run on the `context_tokens` = m context tokens (6 * P_kv * m) and the scores add
        12 * L * n * m * d.
        """
        n = num_tokens
        total = 6.0 * self.matmul_params() * n + 12.0 * len(self.blocks) * n * n * self.width
        if self.cross_attention:
            if context_tokens is None:
                raise ValueError("a cross-attention stack needs context_tokens to count its FLOPs")
            m = context_tokens
            total += 6.0 * self.context_params() * (m - n) + 12.0 * len(self.blocks) * n * m * self.width
        return total


# Name parts of parameters that must not be weight-decayed even when they are matrices. Everything with
# ndim < 2 (LayerNorm weights, all biases, the 0-d `logit_scale`) is excluded by shape already.
NO_WEIGHT_DECAY_NAME_PARTS = ("logit_scale", "pos_embed", "cls_token", "mask_token", "bias")


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names (as in `named_parameters()`) to put in the weight-decay-free optimizer group.

    The rule is shape + naming convention: ndim < 2, or a name containing one of
    NO_WEIGHT_DECAY_NAME_PARTS. So a new module only has to name its position embeddings `pos_embed`,
    its [CLS]-like tokens `cls_token`, a learned [MASK] input `mask_token` and a temperature `logit_scale`
    to be handled correctly.
    `AttentionalPooler.cls_token` (its `q d` learned queries) follows this: learned input tokens, not decayed.
    Tied weights (`MLMHead` sharing the word embedding) appear once, under their first name, and are decayed
    like any matrix. mmpt/engine/optim.py builds the optimizer groups from this function.
    """
    return {
        name
        for name, p in module.named_parameters()
        if p.ndim < 2 or any(part in name for part in NO_WEIGHT_DECAY_NAME_PARTS)
    }
