"""Soft-target ITC with queues: hand-computed reference (explicit loops), hard-label limit, alpha ramp, module."""
from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpt.objectives.itc_distill import DistillContrastiveLoss, alpha_at, distill_itc_loss
from tests.dist_helpers import run_ranks

B, WORLD, RANK, Q, D = 2, 2, 1, 3, 2  # this "rank" owns rows 2..3 of a global batch of 4


def unit(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def example() -> dict[str, torch.Tensor]:
    img_m_all, txt_m_all = unit(WORLD * B, D, seed=1), unit(WORLD * B, D, seed=2)
    local = slice(RANK * B, (RANK + 1) * B)
    return {
        "image_feats": unit(B, D, seed=3), "text_feats": unit(B, D, seed=4),
        "image_feats_m": img_m_all[local], "text_feats_m": txt_m_all[local],
        "image_feats_m_all": img_m_all, "text_feats_m_all": txt_m_all,
        "image_queue": unit(Q, D, seed=5), "text_queue": unit(Q, D, seed=6),
    }


def hand_loss(ex: dict[str, torch.Tensor], s: float, alpha: float) -> float:
    """ALBEF's formula written out element by element in numpy."""
    e = {k: v.numpy() for k, v in ex.items()}

    def direction(query: np.ndarray, query_m: np.ndarray, cands: np.ndarray) -> float:
        total = 0.0
        for i in range(B):
            sims = [s * float(query[i] @ c) for c in cands]
            sims_m = [s * float(query_m[i] @ c) for c in cands]
            z, z_m = sum(math.exp(x) for x in sims), sum(math.exp(x) for x in sims_m)
            for k in range(len(cands)):
                target = alpha * math.exp(sims_m[k]) / z_m + (1 - alpha) * (k == RANK * B + i)
                total -= target * math.log(math.exp(sims[k]) / z)
        return total / B

    txt_cands = np.concatenate([e["text_feats_m_all"], e["text_queue"]])
    img_cands = np.concatenate([e["image_feats_m_all"], e["image_queue"]])
    return 0.5 * (direction(e["image_feats"], e["image_feats_m"], txt_cands)
                  + direction(e["text_feats"], e["text_feats_m"], img_cands))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_matches_hand_computation(alpha: float) -> None:
    ex = example()
    s = torch.tensor(3.0, dtype=torch.float64)
    loss, metrics = distill_itc_loss(**ex, logit_scale=s, alpha=alpha, rank=RANK)
    assert loss.item() == pytest.approx(hand_loss(ex, 3.0, alpha), abs=1e-10)
    assert metrics["temperature"].item() == pytest.approx(1 / 3)


def test_alpha_zero_is_hard_label_cross_entropy_with_gradients() -> None:
    ex = example()
    img = ex["image_feats"].clone().requires_grad_()
    txt = ex["text_feats"].clone().requires_grad_()
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    loss, _ = distill_itc_loss(**(ex | {"image_feats": img, "text_feats": txt}), logit_scale=s, alpha=0.0, rank=RANK)
    got = torch.autograd.grad(loss, (img, txt, s))

    labels = torch.arange(B) + B * RANK
    txt_c = torch.cat([ex["text_feats_m_all"], ex["text_queue"]])
    img_c = torch.cat([ex["image_feats_m_all"], ex["image_queue"]])
    ref = 0.5 * (F.cross_entropy(s * img @ txt_c.T, labels) + F.cross_entropy(s * txt @ img_c.T, labels))
    want = torch.autograd.grad(ref, (img, txt, s))
    torch.testing.assert_close(loss, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_no_gradient_reaches_teacher_or_queue_inputs() -> None:
    ex = {k: v.clone().requires_grad_() for k, v in example().items()}
    loss, _ = distill_itc_loss(**ex, logit_scale=torch.tensor(2.0, dtype=torch.float64), alpha=0.4, rank=RANK)
    loss.backward()
    for name, tensor in ex.items():
        assert (tensor.grad is not None) == (name in ("image_feats", "text_feats")), name


def test_alpha_ramp() -> None:
    assert [alpha_at(s, 0.4, 4) for s in (0, 1, 2, 4, 100)] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])
    assert alpha_at(0, 0.4, 0) == 0.4


def test_module_uses_the_old_queue_then_enqueues_teacher_features() -> None:
    torch.manual_seed(0)
    loss_fn = DistillContrastiveLoss(embed_dim=D, queue_size=3 * B).double()
    assert loss_fn.scale().item() == pytest.approx(1 / 0.07)
    assert (loss_fn.log_min, loss_fn.log_max) == pytest.approx((math.log(2.0), math.log(1000.0)))
    old_img_q, old_txt_q = loss_fn.image_queue.feats.clone(), loss_fn.text_queue.feats.clone()
    img, txt, img_m, txt_m = unit(B, D, seed=7), unit(B, D, seed=8), unit(B, D, seed=9), unit(B, D, seed=10)

    loss, _ = loss_fn(img, txt, img_m, txt_m, alpha=0.4)
    want, _ = distill_itc_loss(img, txt, img_m, txt_m, img_m, txt_m, old_img_q, old_txt_q,
                               loss_fn.scale(torch.float64), 0.4, rank=0)
    torch.testing.assert_close(loss, want)
    loss.backward()  # the in-place enqueue after the loss must not break autograd
    assert loss_fn.logit_scale.grad is not None
    torch.testing.assert_close(loss_fn.image_queue.feats, torch.cat([img_m, old_img_q[B:]]))
    torch.testing.assert_close(loss_fn.text_queue.feats, torch.cat([txt_m, old_txt_q[B:]]))
    assert loss_fn.image_queue.ptr.tolist() == [B]


# ---- 2 gloo processes: local rows against the gathered teacher batch == the full-batch loss ---------------

def _global_inputs() -> tuple[torch.Tensor, ...]:
    """Student and teacher features of a global batch of WORLD * B pairs, identical on every process."""
    return tuple(unit(WORLD * B, D, seed=20 + k) for k in range(4))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        loss_fn = DistillContrastiveLoss(embed_dim=D, queue_size=2 * WORLD * B).double()
        local = slice(rank * B, (rank + 1) * B)
        img, txt, img_m, txt_m = (x[local] for x in _global_inputs())
        img = img.clone().requires_grad_()
        loss, _ = loss_fn(img, txt, img_m, txt_m, alpha=0.4)
        loss.backward()
        scale_grad = loss_fn.logit_scale.grad.clone()
        dist.all_reduce(scale_grad)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.save({"mean_loss": mean_loss / world, "scale_grad": scale_grad / world, "img_grad": img.grad,
                    "queue": loss_fn.image_queue.feats}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_mean_equals_full_batch(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path, WORLD)

    torch.manual_seed(0)  # the same initial queues, one process holding the whole batch
    full = DistillContrastiveLoss(embed_dim=D, queue_size=2 * WORLD * B).double()
    img, txt, img_m, txt_m = _global_inputs()
    img = img.clone().requires_grad_()
    loss, _ = full(img, txt, img_m, txt_m, alpha=0.4)
    loss.backward()
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["mean_loss"], loss.detach())
        torch.testing.assert_close(ranks[r]["scale_grad"], full.logit_scale.grad)  # DeepSpeed-style average
        # Each rank's loss is a mean over its B rows, the full loss over WORLD * B: gradients differ by WORLD.
        torch.testing.assert_close(ranks[r]["img_grad"] / WORLD, img.grad[r * B:(r + 1) * B])
        torch.testing.assert_close(ranks[r]["queue"], full.image_queue.feats)
