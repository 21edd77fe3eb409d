"""ALBEF building blocks: the BERT-like text+fusion tower.

Kept apart from mmpt/models/albef.py so the model file reads as the training step and nothing else.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmpt.modules.block import Transformer
from mmpt.modules.encoders import text_tower_from
from mmpt.modules.heads import MLMHead


class TextFusionEncoder(nn.Module):
    """BERT split in two (ALBEF): `text_layers` text-only layers, then `fusion_layers` layers of
    self-attn -> cross-attn to image tokens -> FFN, plus the MLM head tied to the word embeddings.

    One module (not three model attributes) so that a momentum teacher deep-copies it in one piece and the
    copy keeps the MLM head tied to the copy's own word embeddings.
    """

    def __init__(self, text: Any, fusion_layers: int, context_dim: int, mlm_head: bool = True) -> None:
        """text: a `model.text` config (TextConfig); its width, heads, norms and dropout serve the fusion
        layers too. fusion_layers=0 builds no fusion stack (ITC only); mlm_head=False builds no MLM head."""
        super().__init__()
        self.encoder = text_tower_from(text)
        self.fusion: Transformer | None = None
        if fusion_layers > 0:
            self.fusion = Transformer(
                text.width, fusion_layers, text.heads, text.mlp_ratio, dropout=text.dropout, attn_dropout=text.dropout,
                cross_attention=True, context_dim=context_dim, norm_eps=text.norm_eps, norm_first=text.norm_first,
            )  # fmt: skip
        # pre-LN stacks end with a LayerNorm; BERT's post-LN layers already end normalised
        self.fusion_norm = nn.LayerNorm(text.width, eps=text.norm_eps) if text.norm_first and fusion_layers else nn.Identity()
        self.mlm_head = (
            MLMHead(text.width, text.vocab_size, word_embeddings=self.encoder.embed.token_embed) if mlm_head else None
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass: ids, mask `b l` -> `b l d` ([CLS] at 0 is the ITC summary)."""
        return self.encoder(input_ids, attention_mask)

    def fuse(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Fusion pass: text `b l d` (from `encode`) cross-attending to image tokens `b n c` -> `b l d`."""
        assert self.fusion is not None, "no fusion layers: add itm or mlm to model.objectives"
        x = self.fusion(text_tokens, key_padding_mask=attention_mask, context=image_tokens)
        return self.fusion_norm(x)

    def mlm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        rows: torch.Tensor | None = None,
        detach_text: bool = False,
    ) -> torch.Tensor:
        """Both passes on (masked) ids, then the MLM head at every position, `b l vocab`, or only at the flat
        positions `rows` `k` (`mlm.masked_rows`), `k vocab`. detach_text: no gradient reaches the text encoder's
        output (the tied word embeddings still learn through the output layer); detach image_tokens yourself."""
        text_tokens = self.encode(input_ids, attention_mask)
        if detach_text:
            text_tokens = text_tokens.detach()
        hidden = self.fuse(text_tokens, attention_mask, image_tokens)  # `b l d`
        if rows is not None:
            hidden = hidden.flatten(0, 1)[rows]  # `k d`
        assert self.mlm_head is not None, "no MLM head: add mlm to model.objectives"
        return self.mlm_head(hidden)

    def flops(
        self, text_tokens: int, image_tokens: int, text_passes: int, fusion_passes: int, mlm_rows: float
    ) -> float:
        """Training FLOPs per sample for the given numbers of text-encoder and fusion passes and of rows the
        MLM head scores (a fraction of `text_tokens` when only masked positions are scored)."""
        fusion = fusion_passes * self.fusion.flops(text_tokens, image_tokens) if self.fusion is not None else 0.0
        mlm = self.mlm_head.flops(mlm_rows) if self.mlm_head is not None and mlm_rows else 0.0
        return text_passes * self.encoder.flops_per_sample(text_tokens) + fusion + mlm
