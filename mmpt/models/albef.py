"""ALBEF (Li et al. 2021): ViT + BERT split into text and fusion layers, trained with ITC + ITM + MLM,
optionally distilled from a momentum (EMA) teacher with feature queues.

ITM hard negatives across ranks (the design choice): negatives are sampled from the all-gathered global
batch with the student's ITC similarities (`hard_negative_rows`, shared with VLMo). The fusion pass of a
negative pair needs the partner's token sequence, so the image tokens `b n c`, text tokens `b l d` and text
masks are all-gathered WITHOUT gradient (`gather_rows`): a negative owned by this rank is taken from the local
tensor and keeps its gradient (with one process this is exactly ALBEF's local-batch ITM, gradients
included); a negative owned by another rank is a constant, so the ITM loss does not train that rank's
encoders through it. The ITM head, the fusion layers and the local side of every pair are still trained
on the harder global negatives. Why not a gradient-carrying gather (BLIP/LAVIS gathers image tokens with
grad)? It would reproduce the single-process gradient exactly, but its backward all-reduces a `(w b) n c`
tensor every step, almost all zeros (~400 MB fp32 for ViT-B/16 at 256 px, 64 pairs x 8 ranks). The
no-grad gather costs one transient `(w b) n c` buffer per step (~200 MB bf16 there);
`itm_global_negatives=False` samples from the local batch only (no gather), as the official ALBEF code
does, for very large worlds.
"""
from __future__ import annotations

import torch
from torch import nn

from mmpt.data.batch import Batch
from mmpt.models.albef_config import PRESETS, ALBEFConfig
from mmpt.models.albef_parts import TextFusionEncoder
from mmpt.models.cached_contrastive import CachedContrastive, grad_cache_capability
from mmpt.models.momentum import MomentumTeacher
from mmpt.models.protocol import ModelOutput, check_kind
from mmpt.models.registry import register_arch
from mmpt.modules.encoders import vision_tower_from
from mmpt.modules.heads import ITMHead, ProjectionHead, l2_normalize
from mmpt.models.config_parts import build_contrastive_loss
from mmpt.objectives.itc_distill import DistillContrastiveLoss
from mmpt.objectives.itm import hard_negative_rows, hardness_ramp, itm_loss
from mmpt.objectives.mlm import mask_tokens, masked_rows, masked_rows_capacity, mlm_loss
from mmpt.objectives.pair_codes import itc_codes

__all__ = ["ALBEF", "ALBEFConfig", "build_albef"]


class ALBEF(CachedContrastive, nn.Module):
    """ITC on unimodal [CLS] projections, ITM on the fusion [CLS] with global hard negatives, MLM through
    the fusion layers; implements the `PretrainModel` protocol plus `itm_score` and `after_optimizer_step`, and
    `grad_cache` with objectives=[itc] and no momentum teacher."""

    objectives: tuple[str, ...] = ("itc", "itm", "mlm")
    data_kinds: tuple[str, ...] = ("pairs",)
    default_loss_weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0}  # the paper's equal weights
    step: torch.Tensor

    def __init__(self, cfg: ALBEFConfig) -> None:
        super().__init__()
        self.config = cfg
        self.objectives = tuple(cfg.objectives)
        self.capabilities = frozenset({"itm_score"} if cfg.uses("itm") else ()) | grad_cache_capability(
            cfg.objectives, momentum_teacher=cfg.momentum.enabled)
        self.visual = vision_tower_from(cfg.vision, patch_dropout=cfg.patch_dropout)
        self.text = TextFusionEncoder(
            cfg.text, cfg.fusion_layers if cfg.fuses() else 0, context_dim=cfg.vision.width, mlm_head=cfg.uses("mlm")
        )
        embed_dim = cfg.contrastive.embed_dim
        self.vision_proj = ProjectionHead(cfg.vision.width, embed_dim)
        self.text_proj = ProjectionHead(cfg.text.width, embed_dim)
        self.itm_head = ITMHead(cfg.text.width) if cfg.uses("itm") else None
        m = cfg.momentum
        self.teacher: MomentumTeacher | None = None
        self.itc: ContrastiveLoss
        # Optimizer steps taken, for the alpha ramp and the hard-negative curriculum: a buffer, so checkpoints
        # carry it. Shape (1,) like the queue pointer (some backends reject 0-d broadcasts).
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        if m.enabled:
            c = cfg.contrastive
            self.itc = DistillContrastiveLoss(
                embed_dim, m.queue_size, c.temperature_init, c.min_temperature, c.max_temperature,
                duplicate_positives=c.duplicate_positives,
            )
            self.itc.logit_scale.requires_grad_(c.learnable_temperature)
            students = {"visual": self.visual, "vision_proj": self.vision_proj, "text": self.text, "text_proj": self.text_proj}
            self.teacher = MomentumTeacher(students, momentum=m.decay)  # last: copies the initialised student
        else:
            self.itc = build_contrastive_loss(cfg.contrastive)

    # ---- protocol: embeddings and re-ranking ------------------------------------------------------------
    def bert_init_targets(self) -> tuple[nn.Module, nn.Module]:
        """Where `model.init.text` puts BERT: its first text_layers layers, then the fusion layers."""
        return self.text.encoder, self.text.fusion

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `b c h w` -> L2-normalised `b e` (projected ViT [CLS])."""
        return l2_normalize(self.vision_proj(self.visual(images)[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids, mask `b l` (right-padded, 1 = real) -> L2-normalised `b e` (projected text-only [CLS])."""
        return l2_normalize(self.text_proj(self.text.encode(input_ids, attention_mask)[:, 0]))

    def itm_score(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Match probability `b` of row-aligned pairs (image i with text i), for ITC top-k re-ranking."""
        if self.itm_head is None:
            raise ValueError("itm_score needs the ITM head: add itm to model.objectives")
        fused = self.text.fuse(self.text.encode(input_ids, attention_mask), attention_mask, self.visual(images))
        return self.itm_head(fused[:, 0]).float().softmax(dim=-1)[:, 1]

    # ---- training ---------------------------------------------------------------------------------------
    def distill_alpha(self) -> torch.Tensor:
        """0-d device tensor equal to `alpha_at(step, alpha, alpha_warmup_steps)`, read from the step buffer
        (no host sync); 0 without momentum."""
        m = self.config.momentum
        if self.teacher is None:
            return self.itc.logit_scale.new_zeros(())
        if m.alpha_warmup_steps <= 0:
            return torch.full((), m.alpha, device=self.step.device)
        return m.alpha * (self.step[0].float() / m.alpha_warmup_steps).clamp(max=1.0)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Trainer hook after every optimizer step, outside forward: `step` = optimizer steps completed.
        Stores it (alpha ramp, ITM curriculum; saved in checkpoints) and moves the teacher one EMA step."""
        self.step.fill_(step)
        if self.teacher is not None:
            self.teacher.update()

    def itm_hardness(self) -> torch.Tensor:
        """0-d device tensor in [0, 1]: the share of ITM negative draws that follow softmax(ITC sim), the rest
        uniform (`hardness_ramp`): 0 = uniform negatives, 1 = ALBEF's softmax(sim). A tiny model trained from
        scratch never bootstraps ITM on fully hard negatives (it sits at the 1/3 prior), so
        `itm_hardness_warmup_steps` ramps it in."""
        return hardness_ramp(self.step, self.config.itm.hardness_warmup_steps)

    def forward(self, batch: Batch) -> ModelOutput:
        images, ids, mask = batch.images, batch.input_ids, batch.attention_mask
        image_tokens = self.visual(images)  # `b n c`
        text_tokens = self.text.encode(ids, mask)  # `b l d`
        image_feats = l2_normalize(self.vision_proj(image_tokens[:, 0]))  # `b e`
        text_feats = l2_normalize(self.text_proj(text_tokens[:, 0]))
        cfg = self.config
        metrics: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        image_tokens_m: torch.Tensor | None = None
        alpha = self.distill_alpha()
        codes = itc_codes(cfg.contrastive.duplicate_positives, batch.image_ids, ids, mask)  # `b 2` or None
        if self.teacher is not None:
            t = self.teacher
            with torch.no_grad():
                image_tokens_m = t["visual"](images)  # read again by MLM distillation
                image_feats_m = l2_normalize(t["vision_proj"](image_tokens_m[:, 0]))
                text_feats_m = l2_normalize(t["text_proj"](t["text"].encode(ids, mask)[:, 0]))
            losses["itc"], m = self.itc(image_feats, text_feats, image_feats_m, text_feats_m, alpha, codes)
            metrics["distill_alpha"] = alpha.detach()
        else:
            losses["itc"], m = self.itc(image_feats, text_feats, codes)
        metrics.update(m)
        if not cfg.fusion_grads_to_encoders:  # ITM/MLM train the fusion side only (measured: RESULTS.md)
            image_tokens, text_tokens = image_tokens.detach(), text_tokens.detach()
        if cfg.uses("itm"):
            losses["itm"], m = self._itm(image_tokens, text_tokens, ids, mask, image_feats, text_feats, batch.image_ids)
            metrics.update(m)
        if cfg.uses("mlm"):
            losses["mlm"], m = self._mlm(ids, mask, image_tokens, image_tokens_m, alpha)
            metrics.update(m)
        return ModelOutput(losses=losses, metrics=metrics)

    def _itm(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        image_feats: torch.Tensor,
        text_feats: torch.Tensor,
        image_ids: list[str],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One fusion pass over `(3 b)` pairs: [positives ; image + hard negative text ; text + hard negative image]."""
        b = image_tokens.shape[0]
        neg = hard_negative_rows(
            image_feats, text_feats, self.itc.scale().detach(), ids, mask, image_ids,
            image_rows=[image_tokens], text_rows=[text_tokens, mask],
            global_negatives=self.config.itm.global_negatives, hardness=self.itm_hardness(),
        )  # fmt: skip
        assert self.itm_head is not None
        (neg_image_tokens,), (neg_text_tokens, neg_mask) = neg
        text_in = torch.cat([text_tokens, neg_text_tokens, text_tokens])  # `(3 b) l d`
        mask_in = torch.cat([mask, neg_mask, mask])  # `(3 b) l`
        image_in = torch.cat([image_tokens, image_tokens, neg_image_tokens])  # `(3 b) n c`
        logits = self.itm_head(self.text.fuse(text_in, mask_in, image_in)[:, 0])  # `(3 b) 2`
        return itm_loss(logits[:b], logits[b:])

    def _mlm(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_tokens_m: torch.Tensor | None,
        alpha: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Second text + fusion pass on BERT-masked ids, the MLM head at the masked positions only (`masked_rows`);
        distilled from the teacher's MLM logits there with momentum."""
        cfg = self.config
        masked, labels = mask_tokens(
            ids, mask, cfg.text.vocab_size, cfg.tokens.id("mask"), cfg.tokens.never_masked(), prob=cfg.mlm.mask_prob
        )
        rows, labels = masked_rows(labels, cfg.mlm.mask_prob)  # `k`
        # image_tokens arrive detached from forward when fusion_grads_to_encoders is off
        logits = self.text.mlm_logits(masked, mask, image_tokens, rows, detach_text=not cfg.fusion_grads_to_encoders)
        if self.teacher is None or image_tokens_m is None:
            return mlm_loss(logits, labels)
        with torch.no_grad():
            logits_m = self.teacher["text"].mlm_logits(masked, mask, image_tokens_m, rows)
        return mlm_loss(logits, labels, logits_m, alpha)

    # ---- accounting -------------------------------------------------------------------------------------
    def flops_per_sample(self, kind: str = "pairs", batch_size: int = 1) -> float:
        """Training FLOPs per image-text pair at `batch_size` pairs per micro-batch, for MFU (conventions of
        `CLIP.flops_per_sample`), for the configured objectives only.

        Student (forward + backward): ViT once (on the kept patches with model.patch_dropout, which the
        fusion layers then read); text encoder once, plus once on masked ids with mlm; fusion 3 times with itm
        (the positive, two negative pairs) and once with mlm; MLM head on
        `masked_rows_capacity(batch_size * l) / batch_size` rows; ITM head 3x; projections.
        Teacher (forward only, a third of training FLOPs; eval mode, so every patch): ViT, vision/text
        projections, text encoder (twice with mlm), fusion + MLM head once with mlm. ITC logits against the
        queue: 8 q e (student, both directions, forward + the feature gradient; the candidates are constants)
        + 4 q e (teacher targets).
        Not counted: norms, softmax, GELU, embedding lookups, the global-batch part of the logits and
        hard-negative sampling (O(w b e) per pair).
        """
        if not check_kind(kind, self.data_kinds):
            return 0.0
        cfg = self.config
        l, n = cfg.text.max_text_len, self.visual.num_train_tokens  # the student fuses the kept image tokens
        mlm = cfg.uses("mlm")
        mlm_rows = masked_rows_capacity(batch_size * l, cfg.mlm.mask_prob) / batch_size if mlm else 0.0
        projections = self.vision_proj.flops_per_sample() + self.text_proj.flops_per_sample()
        itm_passes = 3 if cfg.uses("itm") else 0
        student = (
            self.visual.flops_per_sample()
            + self.text.flops(l, n, text_passes=1 + mlm, fusion_passes=itm_passes + mlm, mlm_rows=mlm_rows)
            + (itm_passes * self.itm_head.flops_per_sample() if self.itm_head is not None else 0.0)
            + projections
        )
        if self.teacher is None:
            return student
        pe = self.visual.patch_embed
        # the teacher runs in eval mode: every image token, no patch dropout
        vit_forward = (self.visual.flops_per_sample(dropped=False) + 2.0 * pe.proj.weight.numel() * pe.num_patches) / 3
        n_all = self.visual.num_tokens
        teacher_text = self.text.flops(l, n_all, text_passes=1 + mlm, fusion_passes=int(mlm), mlm_rows=mlm_rows)
        teacher = vit_forward + (teacher_text + projections) / 3
        queue = 12.0 * cfg.momentum.queue_size * cfg.contrastive.embed_dim
        return student + teacher + queue


@register_arch("albef", ALBEFConfig, PRESETS)
def build_albef(cfg: ALBEFConfig) -> ALBEF:
    return ALBEF(cfg)
