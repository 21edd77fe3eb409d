"""The backbone VLMo and BEiT-3 share: image + text embeddings, a `MultiwayTransformer`, final LayerNorm(s).

One module, three passes (image tokens always first, so `split` = image tokens):
- `encode_image(images, image_mask)` -> `b (1+n) d`: image-only (V-FFN everywhere; BEiT masked image modeling
  replaces masked patches by a learned [MASK] embedding before positions are added);
- `encode_text(input_ids, attention_mask)` -> `b l d`: text-only (L-FFN everywhere; MLM, VLMo's text stage);
- `encode_pair(images, input_ids, attention_mask, image_mask)` -> `b (1+n+l) d`: fused, the top `vl_layers`
  blocks use VL-FFN (VLMo ITM/MLM; BEiT-3 masked data modeling on pairs).
Model classes are thin wrappers: they pick a pass, pool ([CLS] of each side), and add heads.

Layout switches (presets in mmpt/models/multiway_presets.py):
- `type_embed`: a 2-row modality-type embedding (row 0 image, row 1 text) added in every pass (VLMo);
- `text_embed_norm`: BERT's LayerNorm on the text embedding sum (VLMo uses HF `BertEmbeddings`);
- `decoupled_attention`: per-modality attention (released BEiT-3) and per-modality final norms `norm_v` /
  `norm_l`; otherwise one shared final `norm` (VLMo);
- `sub_norm`: torchscale's Sub-LN (released BEiT-3, needs decoupled attention);
- `layer_scale`: per-channel residual scales (VLMo/BEiT init 0.1).
`patch_dropout=p` (FLIP, mmpt/modules/patch_dropout.py): in training, the image-only and fused passes keep
[CLS] + round((1 - p) n) random patches per image, so `split` (and where text starts) is the kept count; it
cannot be combined with an image mask (masked image modeling predicts every masked patch).

Parameter names for freezing patterns: `patch_embed.*` (incl. `patch_embed.mask_token`), `text_embed.*`,
`type_embed.*`, `transformer.blocks.<i>.{attn_norm,attn,ffn_v,ffn_l,ffn_vl}.*`, final `norm*`.
"""
from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from mmpt.modules.block import init_weights_
from mmpt.modules.embeddings import PatchEmbedding, TextEmbedding
from mmpt.modules.multiway import MultiwayTransformer, Streams, join_streams, route
from mmpt.modules.patch_dropout import PatchDropout, kept_patches

IMAGE_TYPE, TEXT_TYPE = 0, 1


class MultiwayEncoder(nn.Module):
    """Images and/or text -> Multiway tokens `b n d` after the final LayerNorm(s); see the module docstring."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        image_size: int,
        patch_size: int,
        vocab_size: int,
        max_text_len: int,
        mlp_ratio: float = 4.0,
        ffn_dim: int | None = None,
        vl_layers: int = 0,
        decoupled_attention: bool = False,
        sub_norm: bool = False,
        type_embed: bool = False,
        text_embed_norm: bool = False,
        layer_scale: float | None = None,
        in_chans: int = 3,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
        patch_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.width = width
        self.patch_embed = PatchEmbedding(image_size, patch_size, width, in_chans=in_chans, mask_token=True)
        self.patch_dropout = PatchDropout(patch_dropout, prefix_tokens=1)
        # dropout 0 here: `self.drop` applies it once, after the modality-type embedding, to both modalities
        self.text_embed = TextEmbedding(vocab_size, max_text_len, width, 0.0, norm=text_embed_norm, norm_eps=norm_eps)
        self.type_embed: nn.Embedding | None = nn.Embedding(2, width) if type_embed else None
        self.drop = nn.Dropout(dropout)
        self.transformer = MultiwayTransformer(
            width,
            layers,
            heads,
            mlp_ratio,
            vl_layers=vl_layers,
            decoupled_attention=decoupled_attention,
            ffn_dim=ffn_dim,
            sub_norm=sub_norm,
            qkv_bias=qkv_bias,
            dropout=dropout,
            attn_dropout=attn_dropout,
            norm_eps=norm_eps,
            layer_scale=layer_scale,
        )
        self.norm: nn.LayerNorm | None = None
        self.norm_v: nn.LayerNorm | None = None
        self.norm_l: nn.LayerNorm | None = None
        if decoupled_attention:
            self.norm_v = nn.LayerNorm(width, eps=norm_eps)
            self.norm_l = nn.LayerNorm(width, eps=norm_eps)
        else:
            self.norm = nn.LayerNorm(width, eps=norm_eps)
        if self.type_embed is not None:
            init_weights_(self.type_embed)  # the other parts initialise themselves

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def num_image_tokens(self) -> int:
        """[CLS] + patches: the `split` of a fused sequence."""
        return self.patch_embed.num_tokens

    @property
    def num_train_image_tokens(self) -> int:
        """[CLS] + the patches patch dropout keeps: the image tokens of a training pass."""
        return 1 + kept_patches(self.num_patches, self.patch_dropout.p)

    @property
    def max_text_len(self) -> int:
        return self.text_embed.max_len

    def _with_type(self, x: torch.Tensor, kind: int) -> torch.Tensor:
        return x + self.type_embed.weight[kind] if self.type_embed is not None else x

    def _embed_image(self, images: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        if image_mask is not None and self.patch_dropout.active():
            raise ValueError("patch dropout cannot be combined with an image mask (masked image modeling predicts "
                             "every masked patch): set model.patch_dropout=0 or drop the image-masking objective")
        return self.patch_dropout(self._with_type(self.patch_embed(images, patch_mask=image_mask), IMAGE_TYPE))

    def _embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"input_ids and attention_mask must both be `b l` of the same shape, got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        return self._with_type(self.text_embed(input_ids), TEXT_TYPE)

    def _final_norm(self, xs: Streams) -> torch.Tensor:
        """The final LayerNorm(s) on each side, then the sides joined: `b n d`, image tokens first."""
        if self.norm is not None:
            return self.norm(join_streams(xs))  # one norm for both sides: one call on the joined sequence
        assert self.norm_v is not None and self.norm_l is not None
        return join_streams(route(xs, self.norm_v, self.norm_l))

    def encode_image(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images `b c h w` (+ image_mask `b n` bool, True = masked patch) -> `b (1+n) d`, [CLS] first (n: the
        kept patches in training with patch dropout)."""
        x = self.drop(self._embed_image(images, image_mask))
        return self._final_norm(self.transformer.forward_streams((x, None), None))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids `b l`, attention_mask `b l` (1 = real token) -> `b l d` (padded rows are meaningless)."""
        x = self.drop(self._embed_text(input_ids, attention_mask))
        return self._final_norm(self.transformer.forward_streams((None, x), attention_mask))

    def encode_pair(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused pass -> `b (1+n+l) d`: image tokens ([CLS] first) then text tokens; text padding is masked.
        With patch dropout in training n is the kept count: text starts at `text_start(fused, input_ids)`."""
        img = self._embed_image(images, image_mask)
        txt = self._embed_text(input_ids, attention_mask)
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"encode_pair got {img.shape[0]} images but {txt.shape[0]} texts")
        image_keep = repeat(torch.ones(img.shape[1], dtype=torch.bool, device=img.device), "n -> b n", b=img.shape[0])
        keep = torch.cat([image_keep, attention_mask.bool()], dim=1)
        xs = (self.drop(img), self.drop(txt))  # the sides stay apart until the final norms (multiway.py)
        return self._final_norm(self.transformer.forward_streams(xs, keep, fused=True))

    @staticmethod
    def text_start(fused: torch.Tensor, input_ids: torch.Tensor) -> int:
        """Index of the first text token (the text [CLS]) in an `encode_pair` output: text comes last."""
        return fused.shape[1] - input_ids.shape[1]

    def flops(self, image: bool, text_len: int = 0) -> float:
        """Training FLOPs of one pass over one sample: `image` tokens (if any) + `text_len` text tokens.

        Image tokens are those of a training pass (`num_train_image_tokens`: fewer with patch dropout). The
        patch projection counts 4 * weights * patches (images need no input gradient), as
        `VisionTransformer.flops_per_sample` does; embedding lookups are free.
        """
        pe = self.patch_embed
        n = (self.num_train_image_tokens if image else 0) + text_len
        patch = 4.0 * pe.proj.weight.numel() * pe.num_patches if image else 0.0
        return patch + self.transformer.flops(n)
