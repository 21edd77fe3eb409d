"""MLM masking rates and protections, random-token range, loss vs a hand computation, alpha limits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpt.objectives.mlm import IGNORE_INDEX, _random_regular_tokens, mask_tokens, mlm_loss

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL = (PAD, CLS, SEP, UNK)  # [MASK] is protected even when the caller forgets it
VOCAB = 500


def make_batch(b: int = 256, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] [PAD]...; word ids in [5, VOCAB), a few of them [UNK]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, length + 1, (b,), generator=gen)
    pos = torch.arange(length)[None, :]
    ids = torch.randint(5, VOCAB, (b, length), generator=gen)
    ids = torch.where(torch.rand(b, length, generator=gen) < 0.02, torch.full_like(ids, UNK), ids)
    ids[:, 0] = CLS
    ids = torch.where(pos == lengths[:, None] - 1, torch.full_like(ids, SEP), ids)
    attention = (pos < lengths[:, None]).long()
    ids = torch.where(attention.bool(), ids, torch.full_like(ids, PAD))
    return ids, attention


def test_rates_protections_and_labels() -> None:
    ids, attention = make_batch()
    masked, labels = mask_tokens(ids, attention, VOCAB, MASK, SPECIAL, generator=torch.Generator().manual_seed(1))
    protected = torch.isin(ids, torch.tensor(SPECIAL)) | (attention == 0)
    selected = labels != IGNORE_INDEX

    assert not selected[protected].any()  # [CLS]/[SEP]/[PAD]/[UNK] and padding are never predicted
    torch.testing.assert_close(masked[protected], ids[protected])
    torch.testing.assert_close(labels[selected], ids[selected])  # labels hold the original token
    assert (masked[~selected] == ids[~selected]).all()  # nothing changes outside the selection

    candidates = (~protected).sum().item()
    n = selected.sum().item()
    assert candidates > 6000 and n / candidates == pytest.approx(0.15, abs=0.02)  # sigma ~ 0.004
    is_mask = (masked[selected] == MASK).float().mean().item()
    is_random = ((masked[selected] != MASK) & (masked[selected] != ids[selected])).float().mean().item()
    unchanged = (masked[selected] == ids[selected]).float().mean().item()
    assert is_mask == pytest.approx(0.8, abs=0.05)
    assert is_random == pytest.approx(0.1, abs=0.04)  # a random draw equal to the original: 1/496, negligible
    assert unchanged == pytest.approx(0.1, abs=0.04)
    replaced = masked[selected & (masked != MASK) & (masked != ids)]
    assert not torch.isin(replaced, torch.tensor((*SPECIAL, MASK))).any() and (replaced < VOCAB).all()


def test_deterministic_with_generator_and_prob_bounds() -> None:
    ids, attention = make_batch(b=8)
    a = mask_tokens(ids, attention, VOCAB, MASK, SPECIAL, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, attention, VOCAB, MASK, SPECIAL, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    _, none = mask_tokens(ids, attention, VOCAB, MASK, SPECIAL, prob=0.0)
    assert (none == IGNORE_INDEX).all()
    _, every = mask_tokens(ids, attention, VOCAB, MASK, SPECIAL, prob=1.0)
    protected = torch.isin(ids, torch.tensor(SPECIAL)) | (attention == 0)
    assert ((every != IGNORE_INDEX) == ~protected).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_tokens(ids, attention, VOCAB, MASK, SPECIAL, prob=1.5)


def test_random_tokens_cover_exactly_the_regular_vocab_uniformly() -> None:
    draws = _random_regular_tokens(torch.Size([6000]), 10, [9, 0, 3, 4], torch.device("cpu"),
                                   torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=10)
    assert counts[[0, 3, 4, 9]].sum() == 0
    assert ((counts[[1, 2, 5, 6, 7, 8]] / 6000 - 1 / 6).abs() < 0.02).all()  # 4 sigma ~ 0.019


def test_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [2.0, -1.0, 0.0, 0.5], [0.0, 1.0, 0.0, -1.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[9.0, 9.0, 9.0, 9.0], [1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, 0, 2]])
    alpha = 0.3

    def log_softmax(row: list[float]) -> list[float]:
        z = math.log(sum(math.exp(x) for x in row))
        return [x - z for x in row]

    def softmax(row: list[float]) -> list[float]:
        return [math.exp(x) for x in log_softmax(row)]

    ce = soft = 0.0
    for pos in (1, 2):  # only the labelled positions count
        lp = log_softmax(logits[0, pos].tolist())
        ce -= lp[labels[0, pos].item()]
        soft -= sum(p * q for p, q in zip(softmax(teacher[0, pos].tolist()), lp))
    want = (1 - alpha) * ce / 2 + alpha * soft / 2

    loss, metrics = mlm_loss(logits, labels, teacher, alpha)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert metrics["mlm_acc"].item() == pytest.approx(0.5)  # argmax 0 at pos 1 (right), 1 at pos 2 (wrong)


def test_alpha_zero_is_plain_cross_entropy_and_empty_mask_is_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=gen).masked_fill(torch.rand(2, 5, generator=gen) < 0.5, IGNORE_INDEX)
    want = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    for teacher in (None, torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)):
        got, _ = mlm_loss(logits, labels, teacher, alpha=0.0)
        torch.testing.assert_close(got, want)

    empty, metrics = mlm_loss(logits, torch.full((2, 5), IGNORE_INDEX), torch.randn(2, 5, 7, dtype=torch.float64), 0.4)
    assert empty.item() == 0.0 and metrics["mlm_acc"].item() == 0.0
    empty.backward()  # still part of the graph: a micro-batch without masks does not break the step
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_masked_rows_pick_every_masked_position_and_pad_with_ignored_slots() -> None:
    from mmpt.objectives.mlm import masked_rows, masked_rows_capacity

    assert masked_rows_capacity(1536, 0.15) == math.ceil(0.15 * 1536 + 6 * math.sqrt(1536 * 0.15 * 0.85)) + 8 == 323
    assert masked_rows_capacity(10, 0.5) == 10  # never more rows than positions
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 4], labels[2, 0] = 7, 9, 11
    rows, picked = masked_rows(labels, prob=0.15)
    k = masked_rows_capacity(15, 0.15)
    assert rows.shape == picked.shape == (k,)
    assert rows[:3].tolist() == [1, 9, 10] and picked[:3].tolist() == [7, 9, 11]  # flat index = row * 5 + col
    assert (picked[3:] == IGNORE_INDEX).all() and (rows[3:] == 0).all()
    # the loss on the picked rows equals the loss over every position
    logits = torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(0))
    teacher = torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(1))
    full, m_full = mlm_loss(logits, labels, teacher, alpha=0.4)
    part, m_part = mlm_loss(logits.flatten(0, 1)[rows], picked, teacher.flatten(0, 1)[rows], alpha=0.4)
    assert part.item() == pytest.approx(full.item(), abs=1e-6)
    assert m_part["mlm_acc"].item() == pytest.approx(m_full["mlm_acc"].item())
