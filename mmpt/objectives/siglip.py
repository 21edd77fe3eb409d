"""SigLIP: the pairwise sigmoid loss (Zhai et al. 2023), chunked over ranks with flat memory.

Global loss over the B = w*b pairs of a step (the paper's normalisation: mean over images of the sum over
ALL texts), with t = exp(t') and z_ij = +1 for a positive pair, -1 otherwise:

    L = -(1/B) sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + bias))

Rank r computes loss_r = -(1/b) sum_{i local} sum_j (...), so L = (1/w) sum_r loss_r, the same convention as
`mmpt/objectives/itc.py`: DeepSpeed AVERAGES gradients over ranks, hence rank r's features must receive
d(sum_r' loss_r')/d feat_r = w dL/d feat_r. Image rows appear only in their own rank's loss, so their gradient
is local; a text chunk appears in every rank's loss, so each rank's contribution is sent back to the chunk's
owner and summed there. t' and bias are not exchanged: mean_r d loss_r/d t' = dL/d t'.

Memory (the point of this module): rank r keeps only its own `b e` image and text features. Its text chunk
travels round a ring (send to r+1, receive from r-1), w steps, scoring one `b b` logit block per step. The
blocks are NOT kept for backward: `_ChunkedSigmoid.backward` runs the ring again, recomputes each block,
and passes each chunk's gradient accumulator along with it, so after w steps the accumulator arrives back
at its owner holding every rank's contribution. Autograd holds O(b e) per rank, the transient is one
`b b` block; never `b (w b)` (which a plain chunked loss whose blocks stay in the graph would keep).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmpt.distributed import all_gather_no_grad, rank, world_size
from mmpt.objectives.pair_codes import duplicate_mask


class Ring(Protocol):
    """Neighbour exchange: `shift(tensors)` sends them to rank+1 and returns what rank-1 sent (same shapes)."""

    rank: int
    world: int

    def shift(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]: ...


class ProcessGroupRing:
    """The default process group as a ring (point-to-point; gloo and NCCL both support it)."""

    def __init__(self) -> None:
        self.rank, self.world = rank(), world_size()

    def shift(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        send_to, recv_from = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), send_to) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, recv_from) for t in received]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return received


def _labels(codes: torch.Tensor | None, chunk_codes: torch.Tensor | None, own_chunk: bool, b: int, k: int,
            like: torch.Tensor) -> torch.Tensor:
    """`b k` z: +1 positive, -1 negative. Positives: the diagonal of the own block, or duplicates by codes."""
    if codes is not None and chunk_codes is not None:
        positive = duplicate_mask(codes, chunk_codes)
    else:
        positive = torch.zeros(b, k, dtype=torch.bool, device=like.device)
        if own_chunk:
            positive.fill_diagonal_(True)
    return positive.to(like.dtype) * 2 - 1


class _ChunkedSigmoid(torch.autograd.Function):
    """loss_r and its gradients by a ring over text chunks; saves features only, recomputes blocks."""

    @staticmethod
    def forward(ctx, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                codes: torch.Tensor | None, all_codes: torch.Tensor | None, ring: Ring
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b = img.shape[0]
        total = img.new_zeros(())
        best = img.new_full((b,), -math.inf)  # running arg-max over all texts, for the i2t accuracy metric
        best_positive = torch.zeros(b, dtype=torch.bool, device=img.device)
        chunk = txt
        for step in range(ring.world):
            owner = (ring.rank - step) % ring.world
            chunk_codes = None if all_codes is None else all_codes[owner * b:(owner + 1) * b]
            z = _labels(codes, chunk_codes, step == 0, b, chunk.shape[0], img)
            logits = scale * img @ chunk.T + bias  # `b b`, transient
            total = total - F.logsigmoid(z * logits).sum()
            row_max, col = logits.max(dim=1)
            better = row_max > best
            best = torch.where(better, row_max, best)
            best_positive = torch.where(better, (z.gather(1, col[:, None]).squeeze(1) > 0), best_positive)
            if step + 1 < ring.world:
                (chunk,) = ring.shift([chunk])
        ctx.save_for_backward(img, txt, scale, bias, codes, all_codes)
        ctx.ring = ring
        acc = best_positive.to(img.dtype).mean()
        ctx.mark_non_differentiable(acc)
        return total / b, acc

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_acc: torch.Tensor):  # type: ignore[override]
        img, txt, scale, bias, codes, all_codes = ctx.saved_tensors
        ring: Ring = ctx.ring
        b = img.shape[0]
        g = grad_loss / b
        grad_img = torch.zeros_like(img)
        grad_scale = scale.new_zeros(())
        grad_bias = bias.new_zeros(())
        chunk, chunk_grad = txt, torch.zeros_like(txt)
        for step in range(ring.world):
            owner = (ring.rank - step) % ring.world
            chunk_codes = None if all_codes is None else all_codes[owner * b:(owner + 1) * b]
            z = _labels(codes, chunk_codes, step == 0, b, chunk.shape[0], img)
            sims = img @ chunk.T  # `b b`, recomputed
            # d/d logits of -log sigmoid(z l) = -z sigmoid(-z l)
            d_logits = -z * torch.sigmoid(-z * (scale * sims + bias)) * g  # `b b`
            grad_scale = grad_scale + (d_logits * sims).sum()
            grad_bias = grad_bias + d_logits.sum()
            grad_img = grad_img + scale * d_logits @ chunk
            chunk_grad = chunk_grad + scale * d_logits.T @ img
            if step + 1 < ring.world:
                chunk, chunk_grad = ring.shift([chunk, chunk_grad])
        if ring.world > 1:  # the accumulator is at the rank after its owner's predecessor: one more hop home
            (chunk_grad,) = ring.shift([chunk_grad])
        return grad_img, chunk_grad, grad_scale, grad_bias, None, None, None


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 codes: torch.Tensor | None = None, ring: Ring | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_r, i2t top-1 accuracy) for local `b e` features; `scale`, `bias` 0-d. codes: `b 2` pair codes
    (duplicates are positives) or None (the pair itself only). ring: the process group by default."""
    ring = ring if ring is not None else ProcessGroupRing()
    all_codes = None if codes is None else all_gather_no_grad(codes)  # `(w b) 2`: tiny, ints
    return _ChunkedSigmoid.apply(img, txt, scale, bias, codes, all_codes, ring)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss with learnable log-scale t' (`logit_scale`, init log 10) and bias (`logit_bias`,
    init -10): the paper's initialisation, which starts every pair's probability near sigmoid(-10 +- 10).

    Same call as `ContrastiveLoss` (features, codes -> loss, metrics), so a model swaps one for the other.
    No clamp on t' (the paper has none). Both parameters are shape (1,), as DeepSpeed needs, and 1-d, so
    they get no weight decay (mmpt.modules.block.no_weight_decay_names).
    """

    def __init__(self, scale_init: float = 10.0, bias_init: float = -10.0) -> None:
        super().__init__()
        if scale_init <= 0:
            raise ValueError(f"siglip scale_init must be > 0, got {scale_init}")
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(scale_init)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(bias_init)))

    def scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """t = exp(t') (0-d, carries gradient)."""
        return self.logit_scale.to(dtype).exp().squeeze(0)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, codes: torch.Tensor | None = None,
        ring: Ring | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image_features, text_features: local, L2-normalised `b e`, row i paired with row i. codes: optional
        `b 2` pair codes: duplicates (same image id or identical caption) are then positives (z = +1).
        Returns (loss_r, metrics); metrics are detached 0-d tensors."""
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        s = self.scale(dtype)
        bias = self.logit_bias.to(dtype).squeeze(0)
        loss, acc = sigmoid_loss(image_features.to(dtype), text_features.to(dtype), s, bias, codes, ring)
        metrics = {"siglip_acc_i2t": acc.detach(), "siglip_scale": s.detach(), "siglip_bias": bias.detach()}
        return loss, metrics
