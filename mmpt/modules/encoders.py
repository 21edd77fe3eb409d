"""Unimodal towers: a ViT for images and a transformer for text, both returning all tokens (final LN).

They return every token rather than a pooled vector because the architectures pool differently (CLIP:
[CLS] or EOT; CoCa: attentional pooler; ALBEF: fusion layers cross-attend to all image tokens).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmpt.modules.block import Transformer
from mmpt.modules.embeddings import PatchEmbedding, TextEmbedding
from mmpt.modules.patch_dropout import PatchDropout, kept_patches


class VisionTransformer(nn.Module):
    """Images `b c h w` -> tokens `b n d`, n = 1 + (h/p)^2 with [CLS] at position 0, final LayerNorm.

    `pre_norm=True` adds a LayerNorm (`norm_pre`) on the embedded tokens (patches + [CLS] + positions) before
    the first block: OpenAI CLIP's `ln_pre` (Hugging Face `pre_layrnorm`), needed to load/export that layout.
    `patch_bias=False` drops the patch convolution's bias, as OpenAI CLIP has none.
    `patch_dropout=p`: in training, a random share p of the patch tokens of each image is dropped after the
    position embeddings ([CLS] kept), so the blocks run on 1 + round((1 - p) n) tokens (FLIP; patch_dropout.py).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        in_chans: int = 3,
        cls_token: bool = True,
        norm_eps: float = 1e-5,
        pre_norm: bool = False,
        patch_bias: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        patch_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.width = width
        self.patch_embed = PatchEmbedding(
            image_size, patch_size, width, in_chans=in_chans, cls_token=cls_token, bias=patch_bias
        )
        self.patch_dropout = PatchDropout(patch_dropout, prefix_tokens=1 if cls_token else 0)
        self.norm_pre: nn.LayerNorm | None = nn.LayerNorm(width, eps=norm_eps) if pre_norm else None
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, dropout=dropout, attn_dropout=attn_dropout, norm_eps=norm_eps,
            act_layer=act_layer,
        )  # fmt: skip
        self.norm = nn.LayerNorm(width, eps=norm_eps)

    @property
    def num_tokens(self) -> int:
        return self.patch_embed.num_tokens

    @property
    def num_train_tokens(self) -> int:
        """Tokens the blocks see in a training forward: [CLS] (if any) + the patches patch dropout keeps."""
        pe = self.patch_embed
        return pe.num_tokens - pe.num_patches + kept_patches(pe.num_patches, self.patch_dropout.p)

    def forward(self, images: torch.Tensor, drop_patches: bool = True) -> torch.Tensor:
        """images `b c h w` -> `b t d`: t = num_tokens, or num_train_tokens in training with patch dropout.
        drop_patches=False keeps every patch even in training mode (caption generation)."""
        x = self.patch_embed(images)
        if drop_patches:
            x = self.patch_dropout(x)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        return self.norm(self.transformer(self.drop(x)))

    def flops_per_sample(self, dropped: bool = True) -> float:
        """Training FLOPs for one image: patch projection + `Transformer.flops(tokens)`, tokens =
        `num_train_tokens` (dropped=True, a training forward) or every token (dropped=False: a momentum
        teacher, which runs in eval mode).

        The patch projection counts 4 * weights * patches, not 6: images need no gradient, so its backward
        computes only the weight gradient. It runs on every patch: dropping happens after the embedding.
        """
        pe = self.patch_embed
        tokens = self.num_train_tokens if dropped else self.num_tokens
        return 4.0 * pe.proj.weight.numel() * pe.num_patches + self.transformer.flops(tokens)


class TextTransformer(nn.Module):
    """Token ids `b l` + attention_mask `b l` (1 = real token) -> tokens `b l d`, final LayerNorm.

    Bidirectional by default (BERT-like, pool at [CLS]); `causal=True` gives a GPT/CLIP-style tower whose
    summary token is the last real one. Padded positions are masked as keys, so they never influence real
    tokens; their own outputs are meaningless and must not be pooled.

    `norm_first=False` is BERT's post-LN layout (to load BERT weights): post-LN blocks, a LayerNorm on the
    embeddings instead of the final one (`self.norm` is then an Identity), since each block already ends
    with a LayerNorm.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        causal: bool = False,
        norm_eps: float = 1e-5,
        norm_first: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.width = width
        self.max_len = max_len
        self.causal = causal
        self.norm_first = norm_first
        self.embed = TextEmbedding(
            vocab_size, max_len, width, dropout=dropout, norm=not norm_first, norm_eps=norm_eps
        )
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, dropout=dropout, attn_dropout=attn_dropout, norm_eps=norm_eps,
            norm_first=norm_first, act_layer=act_layer,
        )  # fmt: skip
        self.norm: nn.Module = nn.LayerNorm(width, eps=norm_eps) if norm_first else nn.Identity()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask: `b l`; is_causal overrides the tower's default for this call."""
        causal = self.causal if is_causal is None else is_causal
        x = self.transformer(self.embed(input_ids), key_padding_mask=attention_mask, is_causal=causal)
        return self.norm(x)

    def flops_per_sample(self, seq_len: int | None = None) -> float:
        """Training FLOPs for one padded sequence (default `max_len`); the embedding lookup is free."""
        return self.transformer.flops(seq_len if seq_len is not None else self.max_len)


def vision_tower_from(
    cfg: Any, cls_token: bool = True, act_layer: type[nn.Module] = nn.GELU, patch_dropout: float = 0.0
) -> VisionTransformer:
    """The ViT of a `model.vision` config (mmpt.models.config_parts.VisionConfig: patch grid + tower geometry);
    patch_dropout is `model.patch_dropout` (a model-level switch, not a tower's)."""
    return VisionTransformer(
        cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio,
        dropout=cfg.dropout, attn_dropout=cfg.dropout, cls_token=cls_token, norm_eps=cfg.norm_eps,
        pre_norm=cfg.pre_norm, patch_bias=cfg.patch_bias, act_layer=act_layer, patch_dropout=patch_dropout,
    )  # fmt: skip


def text_tower_from(cfg: Any, causal: bool = False, act_layer: type[nn.Module] = nn.GELU) -> TextTransformer:
    """The text transformer of a `model.text` config (mmpt.models.config_parts.TextConfig)."""
    return TextTransformer(
        cfg.vocab_size, cfg.max_text_len, cfg.width, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio,
        dropout=cfg.dropout, attn_dropout=cfg.dropout, causal=causal, norm_eps=cfg.norm_eps, norm_first=cfg.norm_first,
        act_layer=act_layer,
    )  # fmt: skip
