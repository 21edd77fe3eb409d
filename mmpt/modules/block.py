"""Pre-LN transformer block, a stack of them, and the weight-init recipe shared by every tower."""
from __future__ import annotations

import torch
from torch import nn

from mmpt.modules.attention import Attention, make_attn_mask
from mmpt.modules.mlp import Mlp

# Parameters that are not weights of a Linear/Conv/Embedding but are still initialised trunc-normal.
TOKEN_PARAM_NAMES = ("pos_embed", "cls_token")


def init_weights_(module: nn.Module, std: float = 0.02) -> None:
    """In place: trunc-normal(std, +-2 std) for Linear/Conv/Embedding weights and position/cls tokens,
    zeros for biases, ones/zeros for LayerNorm (BERT/ViT/CLIP-style). A no-op on the meta device."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in m.named_parameters(recurse=False):
            if name in TOKEN_PARAM_NAMES:
                nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)


class Block(nn.Module):
    """Pre-LN block, `b n d -> b n d`: x + attn(ln1(x)); x + ffn(ln2(x)).

    Pre-LN keeps the residual stream un-normalised, so deep stacks train without warm-up tricks; the tower
    applies one final LayerNorm. `mlp` may be injected (e.g. a modality-routed expert FFN); subclasses
    that need extra routing arguments override `ffn`.
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
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp if mlp is not None else Mlp(dim, mlp_ratio=mlp_ratio, dropout=dropout)
        init_weights_(self)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch after attention: `b n d -> b n d`."""
        return self.mlp(self.norm2(x))

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x: `b n d`; key_padding_mask: `b n` (1 = keep); attn_mask: broadcastable to `b h n n`."""
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)
        return x + self.ffn(x)


class Transformer(nn.Module):
    """A stack of `Block`s, `b n d -> b n d` (no final norm: the tower owns it)."""

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
    ) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, qkv_bias, dropout, attn_dropout, norm_eps) for _ in range(layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Masks as in `Block`; they are merged once here instead of once per layer."""
        n = x.shape[1]
        mask = make_attn_mask(n, n, key_padding_mask, attn_mask, is_causal, dtype=x.dtype, device=x.device)
        causal_only = is_causal and mask is None  # keeps SDPA's flash path for pure causal masking
        for block in self.blocks:
            x = block(x, attn_mask=mask, is_causal=causal_only)
        return x

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token (all Linear weights; norms and biases excluded)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops(self, num_tokens: int) -> float:
        """Training (forward + backward) FLOPs for one sequence of `num_tokens` tokens.

        6 * P * n for the weight matmuls (2 per multiply-add forward, x3 for backward's two matmuls) plus
        12 * L * n^2 * d for attention scores QK^T and weights @ V (each 2 n^2 d forward, x3 with backward).
        Causal masking is counted in full, as is conventional (PaLM / nanoGPT MFU).
        """
        n = num_tokens
        return 6.0 * self.matmul_params() * n + 12.0 * len(self.blocks) * n * n * self.width


# Name parts of parameters that must not be weight-decayed even when they are matrices. Everything with
# ndim < 2 (LayerNorm weights, all biases, the 0-d `logit_scale`) is excluded by shape already.
NO_WEIGHT_DECAY_NAME_PARTS = ("logit_scale", "pos_embed", "cls_token", "bias")


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names (as in `named_parameters()`) to put in the weight-decay-free optimizer group.

    The rule is shape + naming convention: ndim < 2, or a name containing one of
    NO_WEIGHT_DECAY_NAME_PARTS. So a new module only has to name its position embeddings `pos_embed`,
    its [CLS]-like tokens `cls_token` and a temperature `logit_scale` to be handled correctly.
    """
    return {
        name
        for name, p in module.named_parameters()
        if p.ndim < 2 or any(part in name for part in NO_WEIGHT_DECAY_NAME_PARTS)
    }
