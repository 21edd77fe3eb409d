"""ALBEF building blocks: the BERT-like text+fusion tower (`gather_rows`, the cross-rank row gather for ITM
negatives, now lives in mmpt/distributed.py and is re-exported here).

Kept apart from mmpt/models/albef.py so the model file reads as the training step and nothing else.
"""
from __future__ import annotations

import torch
from torch import nn

from mmpt.distributed import gather_rows  # noqa: F401  (re-exported: its old home)
from mmpt.modules.block import Transformer
from mmpt.modules.encoders import TextTransformer
from mmpt.modules.heads import MLMHead


class TextFusionEncoder(nn.Module):
    """BERT split in two (ALBEF): `text_layers` text-only layers, then `fusion_layers` layers of
    self-attn -> cross-attn to image tokens -> FFN, plus the MLM head tied to the word embeddings.

    One module (not three model attributes) so that a momentum teacher deep-copies it in one piece and the
    copy keeps the MLM head tied to the copy's own word embeddings.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        width: int,
        text_layers: int,
        fusion_layers: int,
        heads: int,
        context_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        norm_first: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.encoder = TextTransformer(
            vocab_size, max_len, width, text_layers, heads, mlp_ratio=mlp_ratio, dropout=dropout, attn_dropout=dropout,
            norm_eps=norm_eps, norm_first=norm_first,
        )  # fmt: skip
        self.fusion = Transformer(
            width, fusion_layers, heads, mlp_ratio, dropout=dropout, attn_dropout=dropout,
            cross_attention=True, context_dim=context_dim, norm_eps=norm_eps, norm_first=norm_first,
        )  # fmt: skip
        # pre-LN stacks end with a LayerNorm; BERT's post-LN layers already end normalised
        self.fusion_norm = nn.LayerNorm(width, eps=norm_eps) if norm_first else nn.Identity()
        self.mlm_head = MLMHead(width, vocab_size, word_embeddings=self.encoder.embed.token_embed)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass: ids, mask `b l` -> `b l d` ([CLS] at 0 is the ITC summary)."""
        return self.encoder(input_ids, attention_mask)

    def fuse(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Fusion pass: text `b l d` (from `encode`) cross-attending to image tokens `b n c` -> `b l d`."""
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
        return self.mlm_head(hidden)

    def flops(
        self, text_tokens: int, image_tokens: int, text_passes: int, fusion_passes: int, mlm_rows: float
    ) -> float:
        """Training FLOPs per sample for the given numbers of text-encoder and fusion passes and of rows the
        MLM head scores (a fraction of `text_tokens` when only masked positions are scored)."""
        return (
            text_passes * self.encoder.flops_per_sample(text_tokens)
            + fusion_passes * self.fusion.flops(text_tokens, image_tokens)
            + self.mlm_head.flops(mlm_rows)
        )
