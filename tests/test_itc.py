"""ITC loss: hand-computed reference, clamping, and 2-process gloo equivalence with the full-batch loss."""
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
from torch import nn

from mmpt.objectives.itc import ContrastiveLoss
from tests.dist_helpers import run_ranks

WORLD = 2
GLOBAL_BATCH = 8
IN_DIM, EMBED = 6, 5


def test_matches_hand_computation_3x2() -> None:
    """3 pairs, 2-d features: explicit softmax formula in numpy."""
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    txt = F.normalize(torch.tensor([[0.9, 0.1], [0.5, 0.5], [-0.2, 1.0]], dtype=torch.float64), dim=-1)
    loss_fn = ContrastiveLoss(temperature_init=0.5)  # s = 2
    loss, metrics = loss_fn(img, txt)

    x, y, s = img.numpy(), txt.numpy(), 2.0
    i2t = t2i = 0.0
    for i in range(3):
        i2t += -math.log(math.exp(s * x[i] @ y[i]) / sum(math.exp(s * x[i] @ y[k]) for k in range(3)))
        t2i += -math.log(math.exp(s * y[i] @ x[i]) / sum(math.exp(s * y[i] @ x[k]) for k in range(3)))
    want = 0.5 * (i2t / 3 + t2i / 3)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert metrics["temperature"].item() == pytest.approx(0.5)
    sims = x @ y.T
    acc = 0.5 * (np.mean(sims.argmax(1) == np.arange(3)) + np.mean(sims.argmax(0) == np.arange(3)))
    assert metrics["itc_acc"].item() == pytest.approx(acc)


def plain_reference_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Full-matrix symmetric InfoNCE written independently of mmpt (no gather, no clamp)."""
    logits = logit_scale.exp() * img @ txt.T  # `n n`, row i = image i against every text
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def test_single_process_gradients_match_plain_reference() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1).requires_grad_()
    loss_fn = ContrastiveLoss(temperature_init=0.3).double()
    loss, _ = loss_fn(img, txt)
    got = torch.autograd.grad(loss, (img, txt, loss_fn.logit_scale))
    scale = loss_fn.logit_scale.detach().clone().requires_grad_()
    ref = plain_reference_loss(img, txt, scale)
    want = torch.autograd.grad(ref, (img, txt, scale))
    torch.testing.assert_close(loss, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_logit_scale_init_and_clamp() -> None:
    loss_fn = ContrastiveLoss().double()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # Matched pairs with a clear margin (cos 0.57 vs 0.48): the loss always wants a larger scale.
    img = torch.eye(4, dtype=torch.float64)
    txt = F.normalize(img + 5.0, dim=-1)

    def grad_at(logit_scale: float, text: torch.Tensor) -> float:
        loss_fn.logit_scale.grad = None
        with torch.no_grad():
            loss_fn.logit_scale.fill_(logit_scale)
        loss, metrics = loss_fn(img, text)
        loss.backward()
        assert metrics["temperature"].item() == pytest.approx(1 / math.exp(min(logit_scale, math.log(100))))
        return loss_fn.logit_scale.grad.item()

    assert grad_at(math.log(50), txt) < 0  # inside the range: plain gradient
    # Overshooting ln(100): temperature is clamped to 0.01 and the push further up is blocked...
    assert grad_at(10.0, txt) == 0.0
    # ...but a gradient pulling the scale back into range (mismatched pairs want a smaller scale) flows.
    assert grad_at(10.0, txt.flip(0)) > 0


def _setup() -> tuple[nn.Module, ContrastiveLoss, torch.Tensor, torch.Tensor]:
    """Identical on every process: two linear 'encoders', the loss, and a fixed global batch of inputs."""
    torch.manual_seed(0)
    enc = nn.ModuleDict({"img": nn.Linear(IN_DIM, EMBED), "txt": nn.Linear(IN_DIM, EMBED)}).double()
    loss_fn = ContrastiveLoss(temperature_init=0.2).double()
    x_img = torch.randn(GLOBAL_BATCH, IN_DIM, dtype=torch.float64)
    x_txt = x_img + 0.5 * torch.randn(GLOBAL_BATCH, IN_DIM, dtype=torch.float64)
    return enc, loss_fn, x_img, x_txt


def _step(
    enc: nn.Module, loss_fn: ContrastiveLoss, x_img: torch.Tensor, x_txt: torch.Tensor, reference: bool = False
):
    """One forward/backward; `reference=True` uses `plain_reference_loss` instead of the module."""
    feats_img = F.normalize(enc["img"](x_img), dim=-1)
    feats_txt = F.normalize(enc["txt"](x_txt), dim=-1)
    feats_img.retain_grad()
    feats_txt.retain_grad()
    if reference:
        loss, metrics = plain_reference_loss(feats_img, feats_txt, loss_fn.logit_scale), {}
    else:
        loss, metrics = loss_fn(feats_img, feats_txt)
    loss.backward()
    params = dict(enc.named_parameters()) | {"logit_scale": loss_fn.logit_scale}
    return loss.detach(), metrics, {k: p.grad.clone() for k, p in params.items()}, (feats_img.grad, feats_txt.grad)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        enc, loss_fn, x_img, x_txt = _setup()
        b = GLOBAL_BATCH // world
        local = slice(rank * b, (rank + 1) * b)
        loss, metrics, grads, feat_grads = _step(enc, loss_fn, x_img[local], x_txt[local])
        for g in grads.values():  # what DDP / DeepSpeed do: all-reduce, then divide by world size
            dist.all_reduce(g)
            g /= world
        mean_loss = loss.clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        torch.save(
            {"loss": loss, "mean_loss": mean_loss, "grads": grads, "feat_grads": feat_grads, "metrics": metrics},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_equals_full_batch(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path, WORLD)

    enc, loss_fn, x_img, x_txt = _setup()
    full_loss, _, full_grads, (full_gi, full_gt) = _step(enc, loss_fn, x_img, x_txt, reference=True)

    # Loss: the mean of the ranks' local losses is the full-batch loss.
    torch.testing.assert_close(ranks[0]["mean_loss"], full_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(ranks[1]["mean_loss"], full_loss, atol=1e-6, rtol=0)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # each rank really has its own rows
    # Parameter gradients after DDP-style averaging equal the single-process gradients (no extra scaling).
    for name, want in full_grads.items():
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["grads"][name], want, atol=1e-6, rtol=0, msg=f"rank {r} {name}")
        assert want.abs().max() > 1e-4, name  # the comparison is not vacuous
    # Feature gradients: each rank holds the gradient of the SUM of the ranks' losses = world * dL/dfeat.
    b = GLOBAL_BATCH // WORLD
    for r in range(WORLD):
        gi, gt = ranks[r]["feat_grads"]
        torch.testing.assert_close(gi / WORLD, full_gi[r * b : (r + 1) * b], atol=1e-6, rtol=0)
        torch.testing.assert_close(gt / WORLD, full_gt[r * b : (r + 1) * b], atol=1e-6, rtol=0)
