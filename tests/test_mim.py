"""Masked image modeling loss: CE over codebook ids / MSE over pixel targets, masked patches only."""
from __future__ import annotations

import math

import pytest
import torch

from mmpt.objectives.mim import mim_loss

MASK = torch.tensor([[True, False, True], [False, False, True]])  # 3 masked patches of 6


def test_cross_entropy_over_masked_patches_equals_hand_computation():
    pred = torch.tensor(
        [
            [[2.0, 0.0, -1.0, 0.5], [9.0, 9.0, 9.0, 9.0], [0.1, 0.2, 0.3, 3.0]],
            [[1.0, 1.0, 1.0, 1.0], [0.0, 5.0, 0.0, 0.0], [-2.0, 1.0, 0.0, 0.0]],
        ],
        requires_grad=True,
    )
    target = torch.tensor([[0, 3, 1], [2, 2, 1]])
    loss, metrics = mim_loss(pred, target, MASK)

    def ce(logits: list[float], label: int) -> float:
        return math.log(sum(math.exp(v) for v in logits)) - logits[label]

    masked = [((0, 0), 0), ((0, 2), 1), ((1, 2), 1)]
    expected = sum(ce(pred[b, n].tolist(), t) for (b, n), t in masked) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # argmax hits: (0,0) -> 0 == 0 yes; (0,2) -> 3 != 1; (1,2) -> 1 == 1 yes; unmasked hits do not count
    assert metrics["mim_acc"].item() == pytest.approx(2 / 3)
    loss.backward()
    assert pred.grad[~MASK].abs().sum() == 0 and pred.grad[MASK].abs().sum() > 0


def test_mse_over_masked_patches_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 5, generator=g)
    loss, metrics = mim_loss(pred, target, MASK.long())  # 0/1 masks work as well as bools
    per_patch = [
        sum((pred[b, n, k].item() - target[b, n, k].item()) ** 2 for k in range(5)) / 5
        for b, n in [(0, 0), (0, 2), (1, 2)]
    ]
    assert loss.item() == pytest.approx(sum(per_patch) / 3, rel=1e-6)
    assert metrics == {}
    loss.backward()
    assert pred.grad[~MASK].abs().sum() == 0


@pytest.mark.parametrize("kind", ["ids", "pixels"])
def test_batch_without_masked_patches_gives_zero_loss_with_a_graph(kind):
    pred = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randint(4, (2, 3)) if kind == "ids" else torch.randn(2, 3, 4)
    loss, metrics = mim_loss(pred, target, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and not torch.isnan(loss) and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    if kind == "ids":
        assert metrics["mim_acc"].item() == 0.0


def test_low_precision_logits_are_reduced_in_fp32():
    pred = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(1))
    target = torch.randint(50, (2, 3), generator=torch.Generator().manual_seed(2))
    full, _ = mim_loss(pred, target, MASK)
    half, _ = mim_loss(pred.bfloat16(), target, MASK)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(mim_loss(pred.bfloat16().float(), target, MASK)[0].item(), rel=1e-6)
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


@pytest.mark.parametrize(
    "pred_shape, target, mask_shape, message",
    [
        ((2, 3, 4), torch.zeros(2, 4, dtype=torch.long), (2, 3), "integer targets"),
        ((2, 3, 4), torch.zeros(2, 3, 5), (2, 3), "float targets must match"),
        ((2, 3, 4), torch.zeros(2, 3, dtype=torch.long), (2, 4), "image_mask `b n`"),
        ((6, 4), torch.zeros(6, dtype=torch.long), (6,), "image_mask `b n`"),
    ],
)
def test_shape_mismatches_are_clear_errors(pred_shape, target, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        mim_loss(torch.zeros(pred_shape), target, torch.ones(mask_shape, dtype=torch.bool))
