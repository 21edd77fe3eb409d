"""BEiT-3: one Multiway Transformer pretrained by masked data modeling on texts, images and image-text pairs.

Masked data modeling (MDM) is ONE objective over three kinds of data mixed in every batch (a `MixedBatch`):
- texts:  15% of the real, non-special tokens masked (BERT 80/10/10), text-only pass (L-FFN), predict them;
- images: the data's block-wise patch mask (~40%), image-only pass (V-FFN), predict the visual tokens of
          the masked patches (targets from the frozen visual tokenizer on the unmasked image);
- pairs:  50% of the text tokens AND the image mask, one fused pass, predict both.
It is logged by modality: `mdm_text` = cross-entropy over every masked text token of the batch (texts and
pairs pooled), `mdm_image` = the MIM loss over every masked patch (images and pairs pooled); their sum is
the paper's objective. Retrieval uses the dual-encoder path: [CLS] of the image-only / text-only pass ->
projection -> L2 norm, trained by `itc` (ContrastiveLoss over pairs) in a separate short stage.

Forward returns the terms the batch's kinds produce among `config.objectives` (a mixed batch has the same
kinds every step, so every step and rank logs the same keys); a batch that produces none, or carries a kind
no objective reads, is an error rather than a silent no-op step.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mmpt.data.batch import Batch, MixedBatch
from mmpt.models.beit3_config import PRESETS, BEiT3Config
from mmpt.models.cached_contrastive import CachedContrastive, grad_cache_capability
from mmpt.models.config_parts import build_contrastive_loss
from mmpt.models.freezing import freeze_idle
from mmpt.models.masked_image_head import MaskedImageHead
from mmpt.models.multiway_presets import param_counts_by_part
from mmpt.models.protocol import ModelOutput, check_kind, data_kinds_of
from mmpt.models.registry import register_arch
from mmpt.modules.heads import MLMHead, ProjectionHead, l2_normalize
from mmpt.modules.multiway_encoder import MultiwayEncoder
from mmpt.objectives.mlm import mask_tokens, mlm_loss
from mmpt.objectives.pair_codes import itc_codes


class BEiT3(CachedContrastive, nn.Module):
    """Multiway encoder + MDM heads (MLM over the vocabulary, MIM over the visual tokenizer's targets) + ITC;
    `grad_cache` with objectives=[itc]."""

    data_kinds: tuple[str, ...] = ("pairs", "images", "texts")  # narrowed per instance to what its objectives read
    objectives: tuple[str, ...] = ("mdm_text", "mdm_image")  # per instance: config.objectives
    capabilities: frozenset[str] = frozenset()
    default_loss_weights = {"mdm_text": 1.0, "mdm_image": 1.0, "itc": 1.0}

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.config = cfg
        self.objectives = tuple(name for name in cfg.supported_objectives if name in cfg.objectives)
        self.data_kinds = data_kinds_of(self.objectives)
        self.capabilities = grad_cache_capability(self.objectives)
        width, embed_dim = cfg.multiway.width, cfg.contrastive.embed_dim
        self.encoder = MultiwayEncoder(**vars(cfg.multiway), patch_dropout=cfg.patch_dropout)
        # retrieval heads always exist: evaluation embeds through them whatever the stage trains (frozen without itc)
        self.vision_proj = ProjectionHead(width, embed_dim)
        self.text_proj = ProjectionHead(width, embed_dim)
        self.itc = build_contrastive_loss(cfg.contrastive)
        if not cfg.uses("itc"):
            for module in (self.vision_proj, self.text_proj, self.itc):
                module.requires_grad_(False)
        # untied vocabulary projection straight from the final norm (torchscale BEiT-3's output projection)
        self.mlm_head = (
            MLMHead(width, cfg.multiway.vocab_size, transform=False, bias=False) if cfg.uses("mdm_text") else None
        )
        self.mim_head = MaskedImageHead(width, cfg.tokenizer_config()) if cfg.uses("mdm_image") else None
        freeze_idle(self, self._idle_patterns())

    def _idle_patterns(self) -> list[str]:
        """Parameters no configured objective reaches: the [MASK] patch without mdm_image, and the last block's
        per-modality output path (attention out-projection, Sub-LN, expert, final norm) of a modality whose
        outputs no loss reads (text outputs: mdm_text, itc; patch outputs: mdm_image, itc)."""
        cfg = self.config
        last = f"encoder.transformer.blocks.{cfg.multiway.layers - 1}."
        idle = [] if cfg.uses("mdm_image") else ["encoder.patch_embed.mask_token"]
        for side, read in (("v", cfg.uses("mdm_image") or cfg.uses("itc")), ("l", cfg.uses("mdm_text") or cfg.uses("itc"))):
            if not read:
                idle += [f"{last}attn.{side}.proj.*", f"{last}attn.sub_norm_{side}.*", f"{last}ffn_{side}.*",
                         f"encoder.norm_{side}.*"]
        return idle

    # ---- retrieval (dual encoder) -------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `b c h w` -> L2-normalised `b e` from the image-only pass's [CLS]."""
        return l2_normalize(self.vision_proj(self.encoder.encode_image(images)[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask `b l` ([CLS] first, 1 = real token) -> L2-normalised `b e` from [CLS]."""
        return l2_normalize(self.text_proj(self.encoder.encode_text(input_ids, attention_mask)[:, 0]))

    # ---- training -----------------------------------------------------------------------------------------
    def forward(self, batch: Batch | MixedBatch) -> ModelOutput:
        parts = batch.parts if isinstance(batch, MixedBatch) else {batch.kind: batch}
        self._check_parts(parts)
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        if self.mlm_head is not None or self.mim_head is not None:
            losses, metrics = self._mdm(parts)
        pairs = parts.get("pairs")
        if "itc" in self.objectives and pairs is not None:
            assert pairs.images is not None and pairs.input_ids is not None and pairs.attention_mask is not None
            codes = itc_codes(self.config.contrastive.duplicate_positives, pairs.image_ids, pairs.input_ids, pairs.attention_mask)
            loss, m = self.itc(self.encode_image(pairs.images), self.encode_text(pairs.input_ids, pairs.attention_mask), codes)
            losses["itc"] = loss
            metrics.update(m)
        if not losses:
            raise ValueError(
                f"BEiT-3 got a batch of {sorted(parts)} that none of model.objectives={list(self.objectives)} can "
                "train on (itc needs pairs); feed data.sources of the kinds those objectives read"
            )
        return ModelOutput(losses=losses, metrics=metrics)

    def _check_parts(self, parts: dict[str, Batch]) -> None:
        """Shape-free checks (no host sync): kinds this configuration reads, and image masks where MIM needs them."""
        unused = sorted(set(parts) - set(self.data_kinds))
        if unused:
            raise ValueError(
                f"BEiT-3 with model.objectives={list(self.objectives)} has no use for {unused} data (it reads "
                f"{list(self.data_kinds)}); remove those data.sources or add the objective that reads them"
            )
        if self.mim_head is None:
            return
        for kind in ("images", "pairs"):
            part = parts.get(kind)
            if part is not None and part.image_mask is None:
                raise ValueError(
                    f"BEiT-3 mdm_image needs a patch mask on its {kind} (Batch.image_mask `b n`); set "
                    "data.image_mask.enabled=true, or drop mdm_image from model.objectives"
                )

    def _mask_text(self, part: Batch, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        assert part.input_ids is not None and part.attention_mask is not None
        cfg = self.config
        return mask_tokens(part.input_ids, part.attention_mask, cfg.multiway.vocab_size, cfg.tokens.id("mask"),
                           cfg.tokens.never_masked(), prob=ratio)

    def _mdm(self, parts: dict[str, Batch]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One pass per kind, then ONE MLM head call and ONE MIM head call over the pooled positions.

        Text positions of every pass are flattened to `(b l) d` and concatenated (texts and pairs may differ
        in length); patch positions are `b n d` and concatenate along the batch with their images and masks.
        """
        text_h: list[torch.Tensor] = []
        text_y: list[torch.Tensor] = []
        patch_h: list[torch.Tensor] = []
        patch_img: list[torch.Tensor] = []
        patch_mask: list[torch.Tensor] = []
        texts, images, pairs = parts.get("texts"), parts.get("images"), parts.get("pairs")
        if texts is not None and self.mlm_head is not None:
            ids, labels = self._mask_text(texts, self.config.text_mask_ratio)
            text_h.append(self.encoder.encode_text(ids, texts.attention_mask))
            text_y.append(labels)
        if images is not None and self.mim_head is not None:
            assert images.images is not None and images.image_mask is not None
            patch_h.append(self.encoder.encode_image(images.images, images.image_mask)[:, 1:])
            patch_img.append(images.images)
            patch_mask.append(images.image_mask)
        if pairs is not None:
            assert pairs.images is not None and pairs.input_ids is not None and pairs.attention_mask is not None
            ids = pairs.input_ids
            if self.mlm_head is not None:
                ids, labels = self._mask_text(pairs, self.config.pair_text_mask_ratio)
                text_y.append(labels)
            image_mask = pairs.image_mask if self.mim_head is not None else None
            fused = self.encoder.encode_pair(pairs.images, ids, pairs.attention_mask, image_mask)
            split = self.encoder.text_start(fused, ids)  # [CLS] + patches (the kept ones, patch dropout), then text
            if self.mlm_head is not None:
                text_h.append(fused[:, split:])
            if image_mask is not None:
                patch_h.append(fused[:, 1:split])
                patch_img.append(pairs.images)
                patch_mask.append(image_mask)
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        if text_h and self.mlm_head is not None:
            hidden = torch.cat([rearrange(h, "b l d -> (b l) d") for h in text_h])
            labels = torch.cat([rearrange(y, "b l -> (b l)") for y in text_y])
            losses["mdm_text"], m = mlm_loss(self.mlm_head(hidden), labels)
            metrics["mdm_text_acc"] = m["mlm_acc"]
        if patch_h and self.mim_head is not None:
            losses["mdm_image"], m = self.mim_head(torch.cat(patch_h), torch.cat(patch_img), torch.cat(patch_mask))
            if "mim_acc" in m:  # discrete targets only; the pixel-regression loss has no accuracy
                metrics["mdm_image_acc"] = m["mim_acc"]
        return losses, metrics

    # ---- accounting ---------------------------------------------------------------------------------------
    def flops_per_sample(self, kind: str = "pairs", batch_size: int = 1) -> float:
        """Training FLOPs for one sample of `kind` under this model's objectives, for MFU.

        A mixed step costs sum over kinds of (samples of that kind) x flops_per_sample(kind). Text runs over
        max_text_len tokens (padding is computed too); the MLM head scores every text
        position and the MIM head every patch (no host sync to gather the masked ones). ITC adds an image-only
        and a text-only pass per pair plus the two projections. Not counted: norms, softmax, embedding
        lookups, the visual tokenizer (frozen, forward only), the ITC logits.
        """
        if not check_kind(kind, self.data_kinds):
            return 0.0
        enc, length = self.encoder, self.config.multiway.max_text_len
        mlm = self.mlm_head.flops(length) if self.mlm_head is not None else 0.0
        mim = self.mim_head.flops(enc.num_patches) if self.mim_head is not None else 0.0
        if kind == "texts":
            return enc.flops(False, length) + mlm if self.mlm_head is not None else 0.0
        if kind == "images":
            return enc.flops(True) + mim if self.mim_head is not None else 0.0
        mdm = self.mlm_head is not None or self.mim_head is not None
        total = enc.flops(True, length) + mlm + mim if mdm else 0.0  # the fused pass
        if "itc" in self.objectives:
            total += enc.flops(True) + enc.flops(False, length)
            total += self.vision_proj.flops_per_sample() + self.text_proj.flops_per_sample()
        return total

    def param_counts(self) -> dict[str, int]:
        """Backbone parts (attention, ffn_v, ffn_l, ffn_vl, embeddings, other) and each head separately; the
        frozen visual tokenizer is `visual_tokenizer` (not trained). Works on the meta device."""
        counts = {f"backbone/{part}": n for part, n in param_counts_by_part(self.encoder).items()}
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        counts["mlm_head"] = count(self.mlm_head)
        counts["mim_head"] = count(self.mim_head.head) if self.mim_head is not None else 0
        counts["visual_tokenizer"] = count(self.mim_head.tokenizer) if self.mim_head is not None else 0
        counts["itc_heads"] = count(self.vision_proj) + count(self.text_proj) + count(self.itc)
        return counts


@register_arch("beit3", BEiT3Config, PRESETS)
def build_beit3(cfg: BEiT3Config) -> BEiT3:
    return BEiT3(cfg)
