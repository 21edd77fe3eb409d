"""Image-text contrastive (ITC / InfoNCE) loss with global negatives and a local-rows-only loss.

Each rank holds `b` image/text pairs. Features are all-gathered with gradient, and each rank computes
only its own `b` rows against all `w*b` columns (memory O(b * w b) instead of O((w b)^2)):

    logits_i2t `b (w b)` = s * img_local @ txt_all.T,   logits_t2i = s * txt_local @ img_all.T
    labels = arange(b) + b * rank,   loss_r = (CE(logits_i2t) + CE(logits_t2i)) / 2   (mean over b rows)

Why no extra gradient scaling is needed under DDP / DeepSpeed (which AVERAGE gradients over ranks):
the global single-process loss is L = mean over w*b rows = (1/w) * sum_r loss_r. On rank r, autograd
gives d loss_r / d feat_r through the local rows plus d loss_r / d all_feats through the gather;
`all_gather_with_grad`'s backward sums the gathered-feature gradients of all ranks, so the gradient
reaching feat_r is d(sum_r' loss_r') / d feat_r = w * dL / d feat_r. Parameter gradients on rank r are
therefore the sum-loss gradients through rank r's own samples; averaging over ranks gives
(1/w) * d(sum_r' loss_r') / d theta = dL / d theta, exactly the single-process gradient. The same holds
for `logit_scale`, which is not gathered: mean_r d loss_r / d s = dL / ds. (tests/test_itc.py checks it.)
Requires equal local batch sizes on all ranks (the all-gather does too).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.distributed import all_gather_no_grad, all_gather_with_grad, rank
from mmpt.objectives.pair_codes import duplicate_mask


class _ClampRestoring(torch.autograd.Function):
    """clamp(x, lo, hi) whose gradient still flows when it would move x back into [lo, hi].

    A plain clamp has zero gradient outside the range, so a parameter that overshoots the bound (Adam
    momentum) would be frozen there forever; here it can still come back when the loss asks for it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        # Gradient descent moves x by -grad: allow it above hi only if grad > 0, below lo only if grad < 0.
        blocked = ((x > ctx.hi) & (grad < 0)) | ((x < ctx.lo) & (grad > 0))
        return grad.masked_fill(blocked, 0.0), None, None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k targets[k] * log_softmax(logits)[k]; `n k` each."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def positive_targets(positives: torch.Tensor) -> torch.Tensor:
    """`b k` bool positives -> targets spread evenly over each row's positives (every row has its own pair)."""
    weights = positives.float()
    return weights / weights.sum(dim=1, keepdim=True)


def top1_hits(logits: torch.Tensor, labels: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    """`b` float hits of the arg-max column: the pair itself, or any duplicate when `positives` is given."""
    best = logits.argmax(dim=1)
    if positives is None:
        return (best == labels).float()
    return positives.gather(1, best[:, None]).squeeze(1).float()


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over globally gathered features with a learnable temperature.

    The temperature is parameterised as `logit_scale` = log(1 / temperature) (init log(1/0.07)) and is
    clamped to [log(min_logit_scale), log(max_logit_scale)] inside forward, so the parameter is never
    edited in place (safe under ZeRO-3 partitioning). The name `logit_scale` keeps it out of weight decay.
    """

    def __init__(
        self,
        temperature_init: float = 0.07,
        max_logit_scale: float = 100.0,
        min_logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < min_logit_scale <= max_logit_scale:
            raise ValueError(f"need 0 < min_logit_scale <= max_logit_scale, got {min_logit_scale}, {max_logit_scale}")
        if temperature_init <= 0:
            raise ValueError(f"temperature_init must be > 0, got {temperature_init}")
        self.log_min = math.log(min_logit_scale)
        self.log_max = math.log(max_logit_scale)
        # Shape (1,), not 0-d: DeepSpeed's parameter broadcast and ZeRO flattening reject 0-d tensors.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature_init)))

    def scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The clamped multiplicative logit scale s = 1 / temperature (0-d, carries gradient)."""
        return _ClampRestoring.apply(self.logit_scale.to(dtype), self.log_min, self.log_max).exp().squeeze(0)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, codes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image_features, text_features: local, L2-normalised `b e`, row i of one paired with row i of
        the other. codes: optional `b 2` pair codes (`pair_codes`): duplicates of a pair (same image id or
        identical caption) are then positives, the target spread evenly over them, instead of negatives.
        Returns (loss, metrics); metrics are detached 0-d tensors (no host sync here)."""
        b = image_features.shape[0]
        # Logits in at least fp32: in bf16 the softmax over tens of thousands of columns loses precision.
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        img = image_features.to(dtype)
        txt = text_features.to(dtype)
        img_all = all_gather_with_grad(img)  # `(w b) e`, rank-major
        txt_all = all_gather_with_grad(txt)
        s = self.scale(dtype)
        logits_i2t = s * img @ txt_all.T  # `b (w b)`
        logits_t2i = s * txt @ img_all.T  # `b (w b)`
        labels = torch.arange(b, device=img.device) + b * rank()
        positives = None if codes is None else duplicate_mask(codes, all_gather_no_grad(codes))  # `b (w b)`
        if positives is None:
            loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
        else:  # the relation is symmetric: one target matrix serves both directions
            targets = positive_targets(positives)
            loss = 0.5 * (soft_cross_entropy(logits_i2t, targets) + soft_cross_entropy(logits_t2i, targets))
        with torch.no_grad():
            acc_i2t = top1_hits(logits_i2t, labels, positives).mean()
            acc_t2i = top1_hits(logits_t2i, labels, positives).mean()
            metrics = {
                "itc_acc": 0.5 * (acc_i2t + acc_t2i),
                "itc_acc_i2t": acc_i2t,
                "itc_acc_t2i": acc_t2i,
                "temperature": 1.0 / s.detach(),
            }
        return loss, metrics
