"""ITC with momentum distillation and feature queues (ALBEF).

Each rank scores its `b` local student rows against a candidate set made of the momentum (teacher)
features of the whole global batch followed by the queue, `k = w b + q` columns:

    sim_i2t `b k` = s * img_local @ [txt_m_all ; txt_queue].T      (and t2i symmetrically)
    targets       = alpha * softmax(s * img_m_local @ [txt_m_all ; txt_queue].T) + (1 - alpha) * onehot(b*rank + i)
    loss          = (soft_ce(sim_i2t, targets_i2t) + soft_ce(sim_t2i, targets_t2i)) / 2

Candidates are teacher features (no gradient), so gradients reach only the local student rows and the
logit scale: the mean over ranks of the local losses is the global-batch loss and DeepSpeed's gradient
averaging gives the single-process gradient without a gather-with-grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpt.distributed import all_gather_no_grad
from mmpt.distributed import rank as current_rank
from mmpt.objectives.itc import ContrastiveLoss, positive_targets, soft_cross_entropy, top1_hits
from mmpt.objectives.pair_codes import duplicate_mask, unmatched_codes
from mmpt.objectives.queue import FeatureQueue


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """Distillation weight at optimizer step `step` (0-based): linear ramp from 0 to `alpha`, then flat.

    Early teacher predictions are as bad as the student's, so ALBEF trusts them only gradually.
    """
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


def distill_itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    image_feats_m: torch.Tensor,
    text_feats_m: torch.Tensor,
    image_feats_m_all: torch.Tensor,
    text_feats_m_all: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    logit_scale: torch.Tensor,
    alpha: float | torch.Tensor,
    rank: int | None = None,
    positives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Soft-target ITC of local rows against [gathered teacher batch ; queue].

    image_feats, text_feats: student `b d`, L2-normalised, with grad. image_feats_m, text_feats_m: teacher
    `b d` of the same local pairs. *_m_all: teacher `(w b) d`, rank-major (this rank's rows at b*rank).
    *_queue: `q d` (read before this step's enqueue). logit_scale: 0-d s = 1 / temperature (with grad).
    alpha: distillation weight; 0 gives plain InfoNCE against the candidate set.
    positives: optional `b k` bool, the candidates that are duplicates of each local pair (same image id or
    identical caption, `duplicate_mask`); the hard part of the target is then spread evenly over them.
    Returns (loss, metrics); metrics are detached 0-d tensors (no host sync).
    """
    b = image_feats.shape[0]
    r = current_rank() if rank is None else rank
    dtype = torch.promote_types(image_feats.dtype, torch.float32)  # softmax over 65k columns needs fp32
    txt_cand = torch.cat([text_feats_m_all, text_queue], dim=0).detach().to(dtype)  # `k d`
    img_cand = torch.cat([image_feats_m_all, image_queue], dim=0).detach().to(dtype)  # `k d`
    s = logit_scale.to(dtype)
    sim_i2t = s * image_feats.to(dtype) @ txt_cand.T  # `b k`
    sim_t2i = s * text_feats.to(dtype) @ img_cand.T  # `b k`
    labels = torch.arange(b, device=sim_i2t.device) + b * r  # positives inside the gathered block
    with torch.no_grad():
        s_m = s.detach()
        hard = (F.one_hot(labels, sim_i2t.shape[1]) if positives is None else positive_targets(positives)).to(dtype)
        sim_i2t_m = s_m * image_feats_m.to(dtype) @ txt_cand.T
        sim_t2i_m = s_m * text_feats_m.to(dtype) @ img_cand.T
        targets_i2t = alpha * sim_i2t_m.softmax(dim=1) + (1 - alpha) * hard
        targets_t2i = alpha * sim_t2i_m.softmax(dim=1) + (1 - alpha) * hard
    loss = 0.5 * (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i))
    with torch.no_grad():
        acc_i2t = top1_hits(sim_i2t, labels, positives).mean()
        acc_t2i = top1_hits(sim_t2i, labels, positives).mean()
        metrics = {
            "itc_acc": 0.5 * (acc_i2t + acc_t2i),
            "itc_acc_i2t": acc_i2t,
            "itc_acc_t2i": acc_t2i,
            "temperature": 1.0 / s_m,
        }
    return loss, metrics


class DistillContrastiveLoss(ContrastiveLoss):
    """ALBEF's ITC as a module: clamped learnable temperature plus image and text feature queues.

    Temperature bounds are ALBEF's [0.001, 0.5] (logit scale in [2, 1000]). forward gathers the teacher
    features once, computes the loss against the queues as they were before this batch, then enqueues
    the gathered teacher batch (a collective: every rank must call forward). The queue size must be a
    multiple of the global batch (`validate_queue_size`). With `duplicate_positives` a third queue keeps the
    pair codes (`pair_codes`) of the queued features, so a queued duplicate of a pair is a positive too.
    """

    def __init__(
        self,
        embed_dim: int,
        queue_size: int,
        temperature_init: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        duplicate_positives: bool = False,
    ) -> None:
        super().__init__(temperature_init, max_logit_scale=1.0 / min_temperature, min_logit_scale=1.0 / max_temperature)
        self.image_queue = FeatureQueue(embed_dim, queue_size)
        self.text_queue = FeatureQueue(embed_dim, queue_size)
        self.code_queue = FeatureQueue(2, queue_size, unmatched_codes(queue_size)) if duplicate_positives else None

    def forward(  # type: ignore[override]
        self,
        image_feats: torch.Tensor,
        text_feats: torch.Tensor,
        image_feats_m: torch.Tensor,
        text_feats_m: torch.Tensor,
        alpha: float | torch.Tensor,
        codes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student and teacher features are local `b d`, L2-normalised; codes `b 2` (`pair_codes`) are
        required with duplicate_positives. Returns (loss, metrics)."""
        image_m_all = all_gather_no_grad(image_feats_m.detach())  # `(w b) d`
        text_m_all = all_gather_no_grad(text_feats_m.detach())
        positives, codes_all = None, None
        if self.code_queue is not None:
            if codes is None:
                raise ValueError("duplicate_positives needs the pair codes of the batch (objectives.pair_codes.pair_codes)")
            codes_all = all_gather_no_grad(codes)  # `(w b) 2`
            positives = duplicate_mask(codes, torch.cat([codes_all, self.code_queue.feats]))  # `b k`
        dtype = torch.promote_types(image_feats.dtype, torch.float32)
        loss, metrics = distill_itc_loss(
            image_feats, text_feats, image_feats_m, text_feats_m, image_m_all, text_m_all,
            self.image_queue.feats, self.text_queue.feats, self.scale(dtype), alpha,  # cat copies: safe to enqueue
            positives=positives,
        )
        self.image_queue.enqueue_global(image_m_all)
        self.text_queue.enqueue_global(text_m_all)
        if self.code_queue is not None and codes_all is not None:
            self.code_queue.enqueue_global(codes_all)
        return loss, metrics
