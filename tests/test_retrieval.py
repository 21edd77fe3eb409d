"""Retrieval recall against hand-computed rankings, by pair and by caption identity."""
from __future__ import annotations

import math

import pytest
import torch

from mmpt.eval.retrieval import EvalEmbeddings, recall_at_k, retrieval_metrics
from mmpt.objectives.itc import ContrastiveLoss


def test_recall_at_k_hand_computed():
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.1, 0.2, 0.3]])
    correct = torch.eye(3, dtype=torch.bool)
    # query 0: rank 0; query 1: rank 1; query 2: rank 0
    assert recall_at_k(sims, correct, [1, 2]) == {1: pytest.approx(2 / 3), 2: pytest.approx(1.0)}
    # no correct candidate at all never counts as a hit
    assert recall_at_k(sims, torch.zeros(3, 3, dtype=torch.bool), [3]) == {3: 0.0}


def test_caption_identity_counts_equal_captions():
    # two samples share a caption; images 0 and 1 are swapped relative to their texts
    images = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    emb = EvalEmbeddings(images, texts, captions=["a red circle", "a red circle", "a blue square"],
                         image_ids=["k0", "k1", "k2"], keys=["k0", "k1", "k2"])
    m = retrieval_metrics(emb, ks=[1, 2])
    # by pair: text 0 retrieves image 1 first (wrong), text 2 retrieves image 2 (right)
    assert m["retrieval/t2i_r1"] == pytest.approx(1 / 3)
    assert m["retrieval/t2i_r1_caption"] == pytest.approx(1.0)
    assert m["retrieval/i2t_r1_caption"] == pytest.approx(1.0)
    assert m["retrieval/num_pairs"] == 3
    pair_values = [m[f"retrieval/{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 2)]
    assert m["retrieval/mean"] == pytest.approx(sum(pair_values) / 4)


def test_shared_image_id_counts_as_pair():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    emb = EvalEmbeddings(images, texts, captions=["x", "y", "z"], image_ids=["img", "img", "other"], keys=["0", "1", "2"])
    assert retrieval_metrics(emb, ks=[1])["retrieval/t2i_r1"] == pytest.approx(1.0)


class OracleITM(torch.nn.Module):
    """ITM that knows the truth: image i carries i in pixel [0,0,0], text i carries i as token 1."""

    def itm_score(self, images, input_ids, attention_mask):
        return (images[:, 0, 0, 0].round().long() == input_ids[:, 1]).float()


def test_itm_rerank_promotes_true_pairs_inside_top_k_only():
    from mmpt.eval.retrieval import EvalInputs, itm_rerank_sims

    n = 6
    images = torch.eye(n)
    # text i is closest to image (i + 1) % n and 2nd closest to its true image i; image i is closest to
    # text i - 1 and 2nd closest to its true text i
    texts = torch.nn.functional.normalize(images.roll(-1, dims=0) + 0.6 * images, dim=1)
    pixels = torch.zeros(n, 3, 2, 2)
    pixels[:, 0, 0, 0] = torch.arange(n).float()
    ids = torch.zeros(n, 3, dtype=torch.long)
    ids[:, 1] = torch.arange(n)
    keys = [f"{i}" for i in range(n)]
    emb = EvalEmbeddings(images, texts, captions=keys, image_ids=keys, keys=keys,
                         inputs=EvalInputs(pixels, ids, torch.ones_like(ids)))
    before = retrieval_metrics(emb, ks=[1])
    assert before["retrieval/t2i_r1"] == 0.0
    t2i, i2t = itm_rerank_sims(OracleITM(), emb, k=2, device=torch.device("cpu"))
    after = retrieval_metrics(emb, ks=[1], sims_t2i=t2i, sims_i2t=i2t, prefix="retrieval_itm")
    assert after["retrieval_itm/t2i_r1"] == 1.0 and after["retrieval_itm/i2t_r1"] == 1.0
    t2i_k1, i2t_k1 = itm_rerank_sims(OracleITM(), emb, k=1, device=torch.device("cpu"))  # true pair outside top-1
    assert retrieval_metrics(emb, ks=[1], sims_t2i=t2i_k1, sims_i2t=i2t_k1)["retrieval/t2i_r1"] == 0.0


class UnsureITM(torch.nn.Module):
    """ITM that slightly prefers a wrong pair: p = 0.6 for the true pair, 0.62 for every other."""

    def itm_score(self, images, input_ids, attention_mask):
        return torch.where(images[:, 0, 0, 0].round().long() == input_ids[:, 1], 0.6, 0.62)


def test_itm_plus_itc_score_is_log_itm_plus_cosine():
    """Hand computation, text 0 over images {0 (true), 1}: cosines 0.5 and 0.2.
    itm alone: 0.62 > 0.6 -> the wrong image first. itm+itc: log 0.6 + 0.5 = -0.0108 vs
    log 0.62 + 0.2 = -0.2780 -> the true image first (ITM is unsure, the cosine decides)."""
    from mmpt.eval.retrieval import EvalInputs, itm_rerank_sims

    images = torch.eye(2)
    texts = torch.tensor([[0.5, 0.2], [0.0, 1.0]])  # not normalized on purpose: the cosines are the dot products
    pixels = torch.zeros(2, 3, 2, 2)
    pixels[:, 0, 0, 0] = torch.arange(2).float()
    ids = torch.zeros(2, 3, dtype=torch.long)
    ids[:, 1] = torch.arange(2)
    keys = ["0", "1"]
    emb = EvalEmbeddings(images, texts, captions=keys, image_ids=keys, keys=keys,
                         inputs=EvalInputs(pixels, ids, torch.ones_like(ids)))
    cpu = torch.device("cpu")
    t2i_itm, _ = itm_rerank_sims(UnsureITM(), emb, k=2, device=cpu, score="itm")
    t2i_sum, _ = itm_rerank_sims(UnsureITM(), emb, k=2, device=cpu, score="itm+itc")
    assert t2i_itm[0].argmax() == 1 and t2i_sum[0].argmax() == 0
    gap = (t2i_sum[0, 0] - t2i_sum[0, 1]).item()  # the per-row shift cancels in differences
    assert gap == pytest.approx(math.log(0.6) + 0.5 - math.log(0.62) - 0.2, abs=1e-5)
    assert (t2i_sum[0] > 1.0).all()  # re-scored candidates sit above every un-scored cosine
    with pytest.raises(ValueError, match="choose one of itm, itm\\+itc, itm\\+itc_logit"):
        itm_rerank_sims(UnsureITM(), emb, k=2, device=cpu, score="sum")


class ConfidentWrongITM(UnsureITM):
    """p = 0.3 for the true pair, 0.9 for the other; ITC temperature 0.1 (scale 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.itc = ContrastiveLoss(temperature_init=0.1)

    def itm_score(self, images, input_ids, attention_mask):
        return torch.where(images[:, 0, 0, 0].round().long() == input_ids[:, 1], 0.3, 0.9)


def test_itm_plus_itc_logit_weighs_the_cosine_by_the_itc_scale():
    """Text 0 over images {0 (true, cos 0.5), 1 (cos 0.2)}. itm+itc: log 0.3 + 0.5 = -0.704 vs log 0.9 + 0.2 =
    0.095 -> wrong first. itm+itc_logit: log 0.3 + 10 * 0.5 = 3.796 vs log 0.9 + 10 * 0.2 = 1.895 -> true first."""
    from mmpt.eval.retrieval import EvalInputs, itm_rerank_sims

    pixels = torch.zeros(2, 3, 2, 2)
    pixels[:, 0, 0, 0] = torch.arange(2).float()
    ids = torch.zeros(2, 3, dtype=torch.long)
    ids[:, 1] = torch.arange(2)
    keys = ["0", "1"]
    emb = EvalEmbeddings(torch.eye(2), torch.tensor([[0.5, 0.2], [0.0, 1.0]]), captions=keys, image_ids=keys, keys=keys,
                         inputs=EvalInputs(pixels, ids, torch.ones_like(ids)))
    cpu = torch.device("cpu")
    t2i_sum, _ = itm_rerank_sims(ConfidentWrongITM(), emb, k=2, device=cpu, score="itm+itc")
    t2i_logit, _ = itm_rerank_sims(ConfidentWrongITM(), emb, k=2, device=cpu, score="itm+itc_logit")
    assert t2i_sum[0].argmax() == 1 and t2i_logit[0].argmax() == 0
    gap = (t2i_logit[0, 0] - t2i_logit[0, 1]).item()
    assert gap == pytest.approx(math.log(0.3) + 5.0 - math.log(0.9) - 2.0, abs=1e-4)
