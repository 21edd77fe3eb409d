"""VLMo (Bao et al. 2022): one Mixture-of-Modality-Experts transformer used as a dual encoder (ITC) and as a
fusion encoder (ITM, MLM), plus BEiT masked image modeling for the image-only stage.

Each part of a batch decides its terms (a `MixedBatch` has one part per data kind, a `Batch` is one part):
- pairs  -> ITC: image-only pass (V-FFN everywhere) and text-only pass (L-FFN everywhere), [CLS] -> projection;
            ITM: fused pass (VL-FFN in the top `vl_layers`) on [positives ; image + hard negative text ;
            hard negative image + text], negatives drawn from the global ITC similarities
            (`hard_negative_rows`, shared with ALBEF: never the positive, the same image or an identical
            caption); the fused pass reads raw inputs, so the negatives' images and ids are what is picked;
            MLM: fused pass on BERT-masked text (the image unmasked). ITM and MLM share ONE fused call of
            `(4 b)` rows. A pairs part ignores `image_mask` (data.image_mask masks every image it loads).
- images -> MIM: image-only pass with the block-wise `image_mask` from the data (masked patches become
            [MASK]), `MaskedImageHead` on the patch outputs (`model.visual_tokenizer` makes the targets).
- texts  -> MLM: text-only pass on BERT-masked ids. Its masked tokens and the pairs' form ONE `mlm` term
            (mean over every masked token of the micro-batch).

Missing terms: `forward` returns only the losses the batch's kinds produce. The trainer sums
`loss.weights[k] * losses[k]` over the returned keys only, and its interval statistics average each key over
micro-steps and then all-reduce a stack of the sorted keys, so every rank and micro-step must return the
same keys. That holds by construction: `data.sources` gives each source a fixed count in every micro-batch on
every rank (mmpt/data/sources.py), so a run's set of kinds never changes. Returning zeros for absent terms
was rejected: a stage-1 run would log `itc 0.0` as if it were measured.

Stagewise training is config only (mmpt/conf/experiment/vlmo_stage*.yaml): `model.train` / `model.freeze`
patterns over the parameter names (`encoder.transformer.blocks.<i>.{attn_norm,attn,ffn_v,ffn_l,ffn_vl}.*`,
`encoder.{patch_embed,text_embed,type_embed,norm}.*`, heads `image_proj`, `text_proj`, `itc`, `itm_head`,
`mlm_head`, `mim_head`) and `model.init.checkpoint` of the previous stage. A unimodal pass runs one expert
only (mmpt/modules/multiway.py), so the frozen experts of a stage get no gradient at all.
Momentum distillation is not part of VLMo and is not offered.
"""
from __future__ import annotations

import torch
from torch import nn

from mmpt.data.batch import Batch, MixedBatch
from mmpt.models.cached_contrastive import CachedContrastive, grad_cache_capability
from mmpt.models.masked_image_head import MaskedImageHead
from mmpt.models.config_parts import build_contrastive_loss
from mmpt.models.freezing import freeze_idle
from mmpt.models.protocol import ModelOutput, check_kind, data_kinds_of
from mmpt.models.registry import register_arch
from mmpt.models.vlmo_config import PRESETS, VLMoConfig
from mmpt.modules.heads import ITMHead, MLMHead, ProjectionHead, l2_normalize
from mmpt.modules.multiway_encoder import MultiwayEncoder
from mmpt.objectives.itm import hard_negative_rows, hardness_ramp, itm_loss
from mmpt.objectives.mlm import mask_tokens, mlm_loss
from mmpt.objectives.pair_codes import itc_codes

__all__ = ["VLMo", "VLMoConfig", "build_vlmo"]


class VLMo(CachedContrastive, nn.Module):
    """`PretrainModel` with `itm_score`, `after_optimizer_step` and (objectives=[itc]) `grad_cache`; see the module
    docstring."""

    objectives: tuple[str, ...] = ("itc", "itm", "mlm")
    data_kinds: tuple[str, ...] = ("pairs", "texts")
    default_loss_weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "mim": 1.0}  # the paper sums them unweighted
    step: torch.Tensor

    def __init__(self, cfg: VLMoConfig) -> None:
        super().__init__()
        self.config = cfg
        self.objectives = tuple(cfg.objectives)
        self.data_kinds = data_kinds_of(self.objectives)  # image-only data only with mim, and so on
        self.capabilities = frozenset({"itm_score"} if cfg.uses("itm") else ()) | grad_cache_capability(cfg.objectives)
        width, embed_dim = cfg.multiway.width, cfg.contrastive.embed_dim
        self.encoder = MultiwayEncoder(**vars(cfg.multiway), patch_dropout=cfg.patch_dropout)
        self.image_proj = ProjectionHead(width, embed_dim)
        self.text_proj = ProjectionHead(width, embed_dim)
        self.itc = build_contrastive_loss(cfg.contrastive)
        if not cfg.uses("itc"):  # kept for retrieval embeddings, but no objective trains them
            for module in (self.image_proj, self.text_proj, self.itc):
                module.requires_grad_(False)
        self.itm_head = ITMHead(width) if cfg.uses("itm") else None
        self.mlm_head = (
            MLMHead(width, cfg.multiway.vocab_size, word_embeddings=self.encoder.text_embed.token_embed,
                    norm_eps=cfg.multiway.norm_eps) if cfg.uses("mlm") else None
        )  # fmt: skip
        self.mim_head = MaskedImageHead(width, cfg.tokenizer_config()) if cfg.uses("mim") else None
        freeze_idle(self, self._idle_patterns())
        # Optimizer steps taken (hard-negative ramp): a buffer, so checkpoints carry it; (1,) like ALBEF's.
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))

    def _idle_patterns(self) -> list[str]:
        """Parameters no configured objective reaches. Image-only pass with gradient: itc, mim; text-only: itc,
        mlm (text-only data); fused: itm, mlm. The fused pass runs V/L-FFNs below the top `vl_layers` blocks and
        the VL-FFN in them, so the top blocks' V/L-FFNs train only through a unimodal pass."""
        cfg, m = self.config, self.config.multiway
        image = cfg.uses("itc") or cfg.uses("mim")
        text = cfg.uses("itc") or cfg.uses("mlm")
        fused = cfg.uses("itm") or cfg.uses("mlm")
        top = [f"encoder.transformer.blocks.{i}." for i in range(m.layers - m.vl_layers, m.layers)]
        idle = [] if cfg.uses("mim") else ["encoder.patch_embed.mask_token"]
        idle += [] if fused else [b + "ffn_vl.*" for b in top]
        idle += [] if image else [b + "ffn_v.*" for b in top]
        idle += [] if text else [b + "ffn_l.*" for b in top]
        idle += [] if image or fused else ["encoder.transformer.blocks.*.ffn_v.*", "encoder.patch_embed.*"]
        idle += [] if text or fused else ["encoder.transformer.blocks.*.ffn_l.*", "encoder.text_embed.*"]
        return idle

    # ---- protocol: embeddings and re-ranking ------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `b c h w` -> L2-normalised `b e` (image-only pass, projected [CLS])."""
        return l2_normalize(self.image_proj(self.encoder.encode_image(images)[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids, mask `b l` (right-padded, 1 = real) -> L2-normalised `b e` (text-only pass, projected [CLS])."""
        return l2_normalize(self.text_proj(self.encoder.encode_text(input_ids, attention_mask)[:, 0]))

    def itm_score(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Match probability `b` of row-aligned pairs (image i with text i), for ITC top-k re-ranking."""
        if self.itm_head is None:
            raise ValueError("itm_score needs the ITM head: add itm to model.objectives")
        fused = self.encoder.encode_pair(images, input_ids, attention_mask)
        return self.itm_head(self._text_cls(fused, input_ids)).float().softmax(dim=-1)[:, 1]

    def _text_cls(self, fused: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """`b (1+n+l) d` -> `b d`: the text [CLS] after fusion (VLMo pools the first token of its text-first
        sequence; here image tokens come first, so the text [CLS] sits right after them; n is the kept
        patches with patch dropout)."""
        return fused[:, self.encoder.text_start(fused, input_ids)]

    # ---- training ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Trainer hook after every optimizer step: stores `step` (the hard-negative ramp reads it)."""
        self.step.fill_(step)

    def itm_hardness(self) -> torch.Tensor:
        """0-d share in [0, 1] of ITM negative draws that follow softmax(ITC sim), the rest uniform (`hardness_ramp`)."""
        return hardness_ramp(self.step, self.config.itm.hardness_warmup_steps)

    def forward(self, batch: Batch | MixedBatch) -> ModelOutput:
        parts = batch.parts if isinstance(batch, MixedBatch) else {batch.kind: batch}
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        mlm_logits: list[torch.Tensor] = []
        mlm_labels: list[torch.Tensor] = []
        unused = sorted(set(parts) - set(self.data_kinds))
        if unused:
            raise ValueError(f"VLMo with model.objectives={list(self.objectives)} has no use for {unused} data (it "
                             f"reads {list(self.data_kinds)}); remove those data.sources or add the objective")
        if "pairs" in parts:
            pair_losses, logits, labels, m = self._pairs(parts["pairs"])
            losses.update(pair_losses)
            if logits is not None and labels is not None:
                mlm_logits.append(logits)
                mlm_labels.append(labels)
            metrics.update(m)
        if "images" in parts:
            losses["mim"], m = self._mim(parts["images"])
            metrics.update(m)
        if "texts" in parts:
            logits, labels = self._text_mlm(parts["texts"])
            mlm_logits.append(logits)
            mlm_labels.append(labels)
        if mlm_logits:  # one term over every masked token: `(b l) v` rows of each part, concatenated
            v = mlm_logits[0].shape[-1]
            losses["mlm"], m = mlm_loss(torch.cat([x.reshape(-1, v) for x in mlm_logits]),
                                        torch.cat([y.reshape(-1) for y in mlm_labels]))  # fmt: skip
            metrics.update(m)
        return ModelOutput(losses=losses, metrics=metrics)

    def _mask(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return mask_tokens(ids, mask, cfg.multiway.vocab_size, cfg.tokens.id("mask"), cfg.tokens.never_masked(),
                           prob=cfg.mlm.mask_prob)  # fmt: skip

    def _pairs(
        self, batch: Batch
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        """ITC (dual encoder) + ITM and MLM (one fused call of `(3 b)` ITM rows and/or `b` MLM rows), each only
        when configured -> (losses, mlm logits `b l v` or None, labels `b l` or None, metrics)."""
        images, ids, mask = batch.images, batch.input_ids, batch.attention_mask
        assert images is not None and ids is not None and mask is not None  # kind "pairs"
        b, cfg = images.shape[0], self.config
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        if cfg.uses("itc") or cfg.uses("itm"):
            image_feats = l2_normalize(self.image_proj(self.encoder.encode_image(images)[:, 0]))  # `b e`
            text_feats = l2_normalize(self.text_proj(self.encoder.encode_text(ids, mask)[:, 0]))
        if cfg.uses("itc"):
            codes = itc_codes(cfg.contrastive.duplicate_positives, batch.image_ids, ids, mask)
            losses["itc"], metrics = self.itc(image_feats, text_feats, codes)
        rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (images, ids, mask) of the fused call
        if cfg.uses("itm"):
            (neg_images,), (neg_ids, neg_mask) = hard_negative_rows(
                image_feats, text_feats, self.itc.scale().detach(), ids, mask, batch.image_ids,
                image_rows=[images], text_rows=[ids, mask], global_negatives=cfg.itm.global_negatives,
                hardness=self.itm_hardness(),
            )  # fmt: skip
            rows += [(images, ids, mask), (images, neg_ids, neg_mask), (neg_images, ids, mask)]
        labels = None
        if cfg.uses("mlm"):
            masked, labels = self._mask(ids, mask)
            rows.append((images, masked, mask))
        if not rows:
            return losses, None, None, metrics
        fused = self.encoder.encode_pair(*(torch.cat(parts) for parts in zip(*rows)))  # `(r b) (1+n+l) d`
        text_start = self.encoder.text_start(fused, ids)
        if self.itm_head is not None:
            itm_logits = self.itm_head(fused[: 3 * b, text_start])  # `(3 b) 2` from the text [CLS]
            losses["itm"], m_itm = itm_loss(itm_logits[:b], itm_logits[b:])
            metrics.update(m_itm)
        logits = None
        if self.mlm_head is not None:
            logits = self.mlm_head(fused[-b:, text_start:])  # `b l v`
        return losses, logits, labels, metrics

    def _mim(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BEiT masked image modeling on the image-only pass with the data's block-wise mask."""
        if self.mim_head is None:
            raise ValueError(
                "VLMo got an image-only batch but has no MIM head: add mim to model.objectives (model.visual_tokenizer: "
                "kind=pixels, or "
                "kind=kmeans with path=FILE from `mmpt-data visual-tokenizer`), or drop the kind=images source"
            )
        if batch.image_mask is None:
            raise ValueError(
                "VLMo's image-only batches need block-wise patch masks: set data.image_mask.enabled=true "
                "(with data.image_mask.patch_size equal to model.patch_size)"
            )
        assert batch.images is not None
        tokens = self.encoder.encode_image(batch.images, batch.image_mask)  # `b (1+n) d`
        return self.mim_head(tokens[:, 1:], batch.images, batch.image_mask)

    def _text_mlm(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-only pass on BERT-masked ids -> (logits `b l v`, labels `b l`)."""
        ids, mask = batch.input_ids, batch.attention_mask
        assert ids is not None and mask is not None  # kind "texts"
        masked, labels = self._mask(ids, mask)
        return self.mlm_head(self.encoder.encode_text(masked, mask)), labels

    # ---- accounting -------------------------------------------------------------------------------------
    def flops_per_sample(self, kind: str = "pairs", batch_size: int = 1) -> float:
        """Training FLOPs per sample of `kind` for the configured objectives (conventions of
        `CLIP.flops_per_sample`). A mixed micro-batch costs the count-weighted sum over its kinds.

        pairs: image-only and text-only passes (itc; forward only, a third, with itm alone), 3 fused passes (itm) + 1 (mlm), ITC projections,
        the ITM head on 3 rows, the MLM head at every text position. images: image-only pass + MIM head on
        every patch. texts: text-only pass + MLM head. Not counted: norms, softmax, GELU, embedding lookups,
        the ITC logits and hard-negative sampling (O(w b e) per pair), the frozen tokenizer's forward.
        """
        if not check_kind(kind, self.data_kinds):
            return 0.0
        enc, l = self.encoder, self.config.multiway.max_text_len
        mlm = self.mlm_head.flops(l) if self.mlm_head is not None else 0.0
        if kind == "images":
            return enc.flops(image=True) + (self.mim_head.flops(enc.num_patches) if self.mim_head is not None else 0.0)
        if kind == "texts":
            return enc.flops(image=False, text_len=l) + mlm
        cfg, total = self.config, 0.0
        unimodal = enc.flops(image=True) + enc.flops(image=False, text_len=l)
        if cfg.uses("itc"):
            total += unimodal
        elif cfg.uses("itm"):  # forward only: the features just pick hard negatives
            total += unimodal / 3
        if cfg.uses("itc"):
            total += self.image_proj.flops_per_sample() + self.text_proj.flops_per_sample()
        fused_rows = (3 if cfg.uses("itm") else 0) + (1 if cfg.uses("mlm") else 0)
        total += fused_rows * enc.flops(image=True, text_len=l) + mlm
        if self.itm_head is not None:
            total += 3 * self.itm_head.flops_per_sample()
        return total


@register_arch("vlmo", VLMoConfig, PRESETS)
def build_vlmo(cfg: VLMoConfig) -> VLMo:
    return VLMo(cfg)
