"""ITM: hard negatives never hit the positive or a same-image pair, follow softmax(sim), one multinomial call."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from mmpt.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from mmpt.objectives.pair_codes import image_id_codes

B, WORLD, RANK = 4, 2, 1  # local rows are global pairs 4..7
# Global image ids: pair 7 shows the same image as pair 0, pairs 3 and 4 share an image too.
GLOBAL_IDS = ["img0", "img1", "img2", "img3", "img3", "img5", "img6", "img0"]


def setup_example(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = image_id_codes(GLOBAL_IDS)
    sim_i2t = 1.5 * torch.randn(B, WORLD * B, generator=gen)
    sim_t2i = 1.5 * torch.randn(B, WORLD * B, generator=gen)
    return sim_i2t, sim_t2i, codes[RANK * B:(RANK + 1) * B], codes


def expected_weights(sim: torch.Tensor) -> np.ndarray:
    """softmax over columns whose image differs from the row's image, written out directly."""
    out = np.zeros(tuple(sim.shape))
    for i in range(B):
        own = GLOBAL_IDS[RANK * B + i]
        allowed = [j for j in range(WORLD * B) if GLOBAL_IDS[j] != own]
        z = sum(math.exp(sim[i, j].item()) for j in allowed)
        for j in allowed:
            out[i, j] = math.exp(sim[i, j].item()) / z
    return out


@pytest.fixture
def one_thread():
    """Thousands of tiny calls: intra-op threads only add contention on a small shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def draw_counts(draws: int) -> tuple[np.ndarray, np.ndarray]:
    sim_i2t, sim_t2i, ids_local, ids_global = setup_example()
    gen = torch.Generator().manual_seed(123)
    counts_t, counts_i = np.zeros((B, WORLD * B)), np.zeros((B, WORLD * B))
    rows = np.arange(B)
    for _ in range(draws):
        neg_txt, neg_img = sample_hard_negatives(sim_i2t, sim_t2i, ids_local, ids_global, RANK, gen)
        assert neg_txt.dtype == torch.long and neg_txt.shape == (B,) and neg_img.shape == (B,)
        np.add.at(counts_t, (rows, neg_txt.numpy()), 1)
        np.add.at(counts_i, (rows, neg_img.numpy()), 1)
    return counts_t, counts_i


def test_never_positive_or_same_image_and_frequencies_follow_softmax(one_thread: None) -> None:
    draws = 3000
    counts_t, counts_i = draw_counts(draws)
    sim_i2t, sim_t2i, _, _ = setup_example()
    for counts, sim in ((counts_t, sim_i2t), (counts_i, sim_t2i)):
        want = expected_weights(sim)
        assert counts[want == 0].sum() == 0  # positive (diagonal of the rank block) and same-id columns
        freq = counts / draws
        # 3000 draws: the standard error of any frequency is <= 0.5 / sqrt(3000) = 0.009; allow ~4.5 sigma.
        assert np.abs(freq - want).max() < 0.04, np.abs(freq - want).max()
        # Chi-square over allowed cells, per row: df <= 5, the 99.99% quantile is ~25.7.
        for i in range(B):
            ok = want[i] > 0
            chi2 = ((counts[i, ok] - draws * want[i, ok]) ** 2 / (draws * want[i, ok])).sum()
            assert chi2 < 25.7, (i, chi2)


def test_one_multinomial_call_for_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.multinomial

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", counting)
    b, world = 64, 2
    sims = torch.randn(b, world * b)
    ids = torch.arange(world * b)
    neg_txt, neg_img = sample_hard_negatives(sims, sims.flip(0), ids[b:], ids, rank=1)
    assert calls == [torch.Size([2 * b, world * b])]
    positives = torch.arange(b) + b
    assert not (neg_txt == positives).any() and not (neg_img == positives).any()


def test_fallbacks_dominant_positive_all_same_image_and_non_finite(one_thread: None) -> None:
    b, n = 3, 3  # single rank
    sims = torch.zeros(b, n)
    sims.fill_diagonal_(1e4)  # softmax would put all mass on the positive; masked first, so negatives survive
    sims[2] = float("nan")  # a broken row: uniform over its allowed columns
    ids = torch.tensor([7, 7, 8])  # pairs 0 and 1 show one image; pair 2 its own
    gen = torch.Generator().manual_seed(0)
    seen_t: set[tuple[int, int]] = set()
    for _ in range(200):
        neg_txt, neg_img = sample_hard_negatives(sims, sims, ids, ids, rank=0, generator=gen)
        seen_t.update(enumerate(neg_txt.tolist()))
        assert neg_txt[0] == 2 and neg_txt[1] == 2  # the only different image
        assert neg_img[2] in (0, 1)
    assert {(2, 0), (2, 1)} <= seen_t

    all_same = torch.tensor([5, 5, 5])  # no column shows another image: any non-positive column
    for _ in range(50):
        neg_txt, _ = sample_hard_negatives(torch.randn(b, n), torch.randn(b, n), all_same, all_same, 0, gen)
        assert not (neg_txt == torch.arange(b)).any()
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), None, None, 0)


def test_image_id_codes_are_stable_and_consistent() -> None:
    codes = image_id_codes(["a", "b", "a", 17])
    assert codes.dtype == torch.long
    assert codes[0] == codes[2] and codes[0] != codes[1]
    # Pinned: a change of hash would silently change negatives across a resume on other ranks/runs.
    pinned = int.from_bytes(hashlib.blake2b(b"img0", digest_size=8).digest(), "little", signed=True)
    assert image_id_codes(["img0"]).tolist() == [pinned] == [-13583725162565900]


def test_itm_loss_matches_hand_computation() -> None:
    logits_pos = torch.tensor([[0.2, 1.0], [1.5, -0.5]], dtype=torch.float64)
    logits_neg = torch.tensor([[2.0, 0.0], [0.0, 0.3], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    loss, metrics = itm_loss(logits_pos, logits_neg)
    rows = [(l, 1) for l in logits_pos.tolist()] + [(l, 0) for l in logits_neg.tolist()]
    want = sum(-math.log(math.exp(l[y]) / (math.exp(l[0]) + math.exp(l[1]))) for l, y in rows) / 6
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert itm_labels(2).tolist() == [1, 1, 0, 0, 0, 0]
    # argmax: pos rows -> 1, 0 (one right); neg rows -> 0, 1, 0 (tie -> first), 1: two right.
    assert metrics["itm_acc"].item() == pytest.approx(3 / 6)
    assert metrics["itm_acc_pos"].item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="negative logits"):
        itm_loss(logits_pos, logits_neg[:3])


def test_identical_captions_are_never_negatives_of_each_other():
    from mmpt.objectives.pair_codes import text_codes

    ids = torch.tensor([[2, 10, 11, 3, 0], [2, 10, 11, 3, 0], [2, 12, 13, 3, 0], [2, 14, 3, 0, 0]])
    codes = text_codes(ids)
    assert codes[0] == codes[1] and len(set(codes.tolist())) == 3
    sims = torch.zeros(4, 4)
    sims[0, 1] = sims[1, 0] = 20.0  # the twin caption would be by far the "hardest" negative
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_t, neg_i = sample_hard_negatives(sims, sims, None, None, 0, gen, text_codes_local=codes, text_codes_global=codes)
        assert not (neg_t[:2] < 2).any() and not (neg_i[:2] < 2).any()


def test_hardness_mixes_softmax_with_uniform_over_allowed_columns() -> None:
    """hardness h: weights = h softmax(sim) + (1 - h) uniform, both over the allowed columns only."""
    from mmpt.objectives.itm import _negative_weights

    sim, _, _, _ = setup_example()
    codes = image_id_codes(GLOBAL_IDS)
    same = codes[RANK * B:(RANK + 1) * B, None] == codes[None, :]
    positive = torch.zeros(B, WORLD * B, dtype=torch.bool)
    positive[torch.arange(B), torch.arange(B) + RANK * B] = True
    hard = expected_weights(sim)
    uniform = (hard > 0) / (hard > 0).sum(axis=1, keepdims=True)  # allowed = where the softmax has mass
    for h in (0.0, 0.3, 1.0):
        got = _negative_weights(sim, same | positive, positive, torch.tensor(h)).double().numpy()
        np.testing.assert_allclose(got, h * hard + (1 - h) * uniform, atol=1e-6)
    # the ramp: 0 at step 0, linear, 1 after warmup; 1 without a warmup
    from mmpt.objectives.itm import hardness_ramp

    assert [float(hardness_ramp(torch.tensor([s]), 8)) for s in (0, 2, 8, 20)] == [0.0, 0.25, 1.0, 1.0]
    assert float(hardness_ramp(torch.tensor([0]), 0)) == 1.0
