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
            [MASK]), `MaskedImageHead` on the patch outputs (needs `model.mim_tokenizer`).
- texts  -> MLM: text-only pass on BERT-masked ids. Its masked tokens and the pairs' form ONE `mlm` term
            (mean over every masked token of the micro-batch).

Missing terms: `forward` returns only the losses the batch's kinds produce. The trainer sums
`loss.weights[k] * losses[k]` over the returned keys only, and its interval statistics average each key over
micro-steps and then all-reduce a stack of the sorted keys, so every rank and micro-step must return the
same keys. That holds by construction: `data.sources` gives each source a fixed count in every micro-batch on
every rank (mmpt/data/sources.py), so a run's set of kinds never changes. Returning zeros for absent terms
was rejected: a stage-1 run would log `itc 0.0` as if it were measured.

Stagewise training is config only (conf/experiment/vlmo_stage*.yaml): `model.train` / `model.freeze`
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
from mmpt.models.masked_image_head import MaskedImageHead
from mmpt.models.protocol import ModelOutput
from mmpt.models.registry import register_arch
from mmpt.models.vlmo_config import VLMoConfig, vlmo_base_config, vlmo_large_config
from mmpt.modules.block import no_weight_decay_names
from mmpt.modules.heads import ITMHead, MLMHead, ProjectionHead, l2_normalize
from mmpt.modules.multiway_encoder import MultiwayEncoder
from mmpt.objectives.itc import ContrastiveLoss
from mmpt.objectives.itm import hard_negative_rows, hardness_ramp, itm_loss
from mmpt.objectives.mlm import mask_tokens, mlm_loss
from mmpt.objectives.pair_codes import itc_codes

__all__ = ["VLMo", "VLMoConfig", "build_vlmo", "vlmo_base_config", "vlmo_large_config"]


class VLMo(nn.Module):
    """`PretrainModel` with `itm_score` and `after_optimizer_step`; see the module docstring."""

    objectives: tuple[str, ...] = ("itc", "itm", "mlm", "mim")
    data_kinds: tuple[str, ...] = ("pairs", "images", "texts")
    default_loss_weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "mim": 1.0}  # the paper sums them unweighted
    step: torch.Tensor

    def __init__(self, cfg: VLMoConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = MultiwayEncoder(**cfg.encoder_kwargs())
        self.image_proj = ProjectionHead(cfg.width, cfg.embed_dim)
        self.text_proj = ProjectionHead(cfg.width, cfg.embed_dim)
        self.itc = ContrastiveLoss(
            cfg.temperature_init, max_logit_scale=1.0 / cfg.min_temperature, min_logit_scale=1.0 / cfg.max_temperature
        )
        self.itm_head = ITMHead(cfg.width)
        self.mlm_head = MLMHead(cfg.width, cfg.vocab_size, word_embeddings=self.encoder.text_embed.token_embed,
                                norm_eps=cfg.norm_eps)  # fmt: skip
        self.mim_head: MaskedImageHead | None = None
        if cfg.mim_tokenizer is not None:
            self.mim_head = MaskedImageHead(cfg.width, cfg.mim_tokenizer)
        else:  # without a MIM head image-only sources are refused before launch (run_setup reads the instance's)
            self.data_kinds = ("pairs", "texts")
        # Optimizer steps taken (hard-negative ramp): a buffer, so checkpoints carry it; (1,) like ALBEF's.
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))

    # ---- protocol: embeddings and re-ranking ------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `b c h w` -> L2-normalised `b e` (image-only pass, projected [CLS])."""
        return l2_normalize(self.image_proj(self.encoder.encode_image(images)[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids, mask `b l` (right-padded, 1 = real) -> L2-normalised `b e` (text-only pass, projected [CLS])."""
        return l2_normalize(self.text_proj(self.encoder.encode_text(input_ids, attention_mask)[:, 0]))

    def itm_score(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Match probability `b` of row-aligned pairs (image i with text i), for ITC top-k re-ranking."""
        fused = self.encoder.encode_pair(images, input_ids, attention_mask)
        return self.itm_head(self._text_cls(fused)).float().softmax(dim=-1)[:, 1]

    def _text_cls(self, fused: torch.Tensor) -> torch.Tensor:
        """`b (1+n+l) d` -> `b d`: the text [CLS] after fusion (VLMo pools the first token of its text-first
        sequence; here image tokens come first, so the text [CLS] sits right after them)."""
        return fused[:, self.encoder.num_image_tokens]

    # ---- training ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Trainer hook after every optimizer step: stores `step` (the hard-negative ramp reads it)."""
        self.step.fill_(step)

    def itm_hardness(self) -> torch.Tensor:
        """0-d share in [0, 1] of ITM negative draws that follow softmax(ITC sim), the rest uniform (`hardness_ramp`)."""
        return hardness_ramp(self.step, self.config.itm_hardness_warmup_steps)

    def forward(self, batch: Batch | MixedBatch) -> ModelOutput:
        parts = batch.parts if isinstance(batch, MixedBatch) else {batch.kind: batch}
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        mlm_logits: list[torch.Tensor] = []
        mlm_labels: list[torch.Tensor] = []
        if "pairs" in parts:
            itc, itm, logits, labels, m = self._pairs(parts["pairs"])
            losses["itc"], losses["itm"] = itc, itm
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
        return mask_tokens(
            ids, mask, cfg.vocab_size, cfg.mask_token_id, (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id),
            prob=cfg.mlm_prob,
        )  # fmt: skip

    def _pairs(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """ITC (dual encoder) + ITM and MLM (one fused call) -> (itc, itm, mlm logits `b l v`, labels `b l`, metrics)."""
        images, ids, mask = batch.images, batch.input_ids, batch.attention_mask
        assert images is not None and ids is not None and mask is not None  # kind "pairs"
        b = images.shape[0]
        image_feats = l2_normalize(self.image_proj(self.encoder.encode_image(images)[:, 0]))  # `b e`
        text_feats = l2_normalize(self.text_proj(self.encoder.encode_text(ids, mask)[:, 0]))
        loss_itc, metrics = self.itc(image_feats, text_feats,
                                     itc_codes(self.config.itc_duplicate_positives, batch.image_ids, ids, mask))
        (neg_images,), (neg_ids, neg_mask) = hard_negative_rows(
            image_feats, text_feats, self.itc.scale().detach(), ids, mask, batch.image_ids,
            image_rows=[images], text_rows=[ids, mask], global_negatives=self.config.itm_global_negatives,
            hardness=self.itm_hardness(),
        )  # fmt: skip
        masked, labels = self._mask(ids, mask)
        fused = self.encoder.encode_pair(
            torch.cat([images, images, neg_images, images]),  # `(4 b) c h w`
            torch.cat([ids, neg_ids, ids, masked]),  # `(4 b) l`
            torch.cat([mask, neg_mask, mask, mask]),
        )  # rows: positives, image + negative text, negative image + text, MLM
        itm_logits = self.itm_head(self._text_cls(fused[: 3 * b]))  # `(3 b) 2`
        loss_itm, m_itm = itm_loss(itm_logits[:b], itm_logits[b:])
        mlm_logits = self.mlm_head(fused[3 * b :, self.encoder.num_image_tokens :])  # `b l v`
        return loss_itc, loss_itm, mlm_logits, labels, {**metrics, **m_itm}

    def _mim(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BEiT masked image modeling on the image-only pass with the data's block-wise mask."""
        if self.mim_head is None:
            raise ValueError(
                "VLMo got an image-only batch but has no MIM head: set model.mim_tokenizer (kind=pixels, or "
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
    def flops_per_sample(self, kind: str = "pairs") -> float:
        """Training FLOPs per sample of `kind` (default: an image-text pair, for MFU; conventions of
        `CLIP.flops_per_sample`). A mixed micro-batch costs the count-weighted sum over its kinds.

        pairs: image-only and text-only passes, 4 fused passes (3 ITM + 1 MLM), ITC projections, the ITM head
        on 3 rows, the MLM head at every text position. images: image-only pass + MIM head on every patch.
        texts: text-only pass + MLM head. Not counted: norms, softmax, GELU, embedding lookups, the ITC logits
        and hard-negative sampling (O(w b e) per pair), the frozen tokenizer's forward.
        """
        enc, l = self.encoder, self.config.max_text_len
        if kind == "pairs":
            return (
                enc.flops(image=True) + enc.flops(image=False, text_len=l) + 4 * enc.flops(image=True, text_len=l)
                + self.image_proj.flops_per_sample() + self.text_proj.flops_per_sample()
                + 3 * self.itm_head.flops_per_sample() + self.mlm_head.flops(l)
            )  # fmt: skip
        if kind == "images":
            mim = self.mim_head.flops(enc.num_patches) if self.mim_head is not None else 0.0
            return enc.flops(image=True) + mim
        if kind == "texts":
            return enc.flops(image=False, text_len=l) + self.mlm_head.flops(l)
        raise ValueError(f"flops_per_sample: kind={kind!r} is not one of {list(self.data_kinds)}")

    def no_weight_decay_names(self) -> set[str]:
        """Exempt from weight decay: ndim < 2 (norms, biases, layer scales), `pos_embed`, `cls_token`,
        `mask_token`, `logit_scale` (`mmpt.modules.block`)."""
        return no_weight_decay_names(self)


@register_arch("vlmo", VLMoConfig)
def build_vlmo(cfg: VLMoConfig) -> VLMo:
    return VLMo(cfg)
