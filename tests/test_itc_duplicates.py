"""Duplicate pairs as ITC positives (`model.contrastive.duplicate_positives`): pair codes, plain and distilled ITC
against hand computations (explicit loops), the code queue written in step with the feature queues, and the
across-rank case on 2 gloo processes."""
from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpt.objectives.itc import ContrastiveLoss
from mmpt.objectives.itc_distill import DistillContrastiveLoss, distill_itc_loss
from mmpt.objectives.pair_codes import duplicate_mask, pair_codes, unmatched_codes
from tests.dist_helpers import run_ranks
from tests.test_itc_distill import B, RANK, example


def unit(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def soft_ce_by_hand(logits: list[float], targets: list[float]) -> float:
    z = sum(math.exp(x) for x in logits)
    return -sum(t * math.log(math.exp(x) / z) for x, t in zip(logits, targets))


def test_pair_codes_ignore_padding_and_match_by_image_or_caption():
    ids = torch.tensor([[2, 7, 8, 3, 0], [2, 7, 8, 3, 0], [2, 7, 9, 3, 0], [2, 7, 8, 3, 0]])
    mask = (ids != 0).long()
    ids_other_padding = ids.clone()
    ids_other_padding[3, 4] = 5  # a padded position holding junk: masked out, same caption
    codes = pair_codes(["a", "b", "c", "c"], ids_other_padding, mask)
    same = duplicate_mask(codes, codes)
    expected = torch.tensor([[1, 1, 0, 1],   # 0 and 1 and 3: identical captions
                             [1, 1, 0, 1],
                             [0, 0, 1, 1],   # 2 and 3: same image id "c"
                             [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(same, expected)
    assert not duplicate_mask(codes, unmatched_codes(6)).any()  # an unwritten queue slot matches nothing


def test_plain_itc_spreads_the_target_over_duplicates():
    img, txt = unit(3, 4, seed=1), unit(3, 4, seed=2)
    ids = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 5, 3]])  # pairs 0 and 2 share their caption
    codes = pair_codes(["x", "y", "z"], ids, torch.ones_like(ids))
    loss_fn = ContrastiveLoss(temperature_init=0.5).double()
    loss, metrics = loss_fn(img, txt, codes)
    s = 2.0
    targets = [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]
    i2t = sum(soft_ce_by_hand([s * float(img[i] @ txt[k]) for k in range(3)], targets[i]) for i in range(3)) / 3
    t2i = sum(soft_ce_by_hand([s * float(txt[i] @ img[k]) for k in range(3)], targets[i]) for i in range(3)) / 3
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-9)
    plain, _ = loss_fn(img, txt)  # without codes: the one-hot loss of the papers
    assert plain.item() == pytest.approx(float(F.cross_entropy(s * img @ txt.T, torch.arange(3))
                                               + F.cross_entropy(s * txt @ img.T, torch.arange(3))) / 2, rel=1e-9)
    assert plain.item() != pytest.approx(loss.item())
    # accuracy counts a duplicate as a hit (image 0 -> text 2 is right: texts 0 and 2 are one caption)
    hits = [targets[i][int(torch.argmax(img[i] @ txt.T))] > 0 for i in range(3)]
    assert metrics["itc_acc_i2t"].item() == pytest.approx(sum(hits) / 3)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_distilled_itc_counts_a_queued_duplicate_as_positive(alpha):
    ex = example()  # local rows 2..3 of a global batch of 4, then a queue of 3
    k = 4 + 3
    positives = torch.zeros(B, k, dtype=torch.bool)
    positives[0, RANK * B] = positives[1, RANK * B + 1] = True
    positives[0, 4 + 1] = True  # local pair 0 has a duplicate in queue slot 1
    s = 3.0
    loss, _ = distill_itc_loss(**ex, logit_scale=torch.tensor(s, dtype=torch.float64), alpha=alpha, rank=RANK,
                               positives=positives)
    e = {name: v for name, v in ex.items()}

    def direction(query, query_m, cands):
        total = 0.0
        for i in range(B):
            sims = [s * float(query[i] @ c) for c in cands]
            sims_m = [s * float(query_m[i] @ c) for c in cands]
            z_m = sum(math.exp(x) for x in sims_m)
            hard = [float(positives[i, j]) / float(positives[i].sum()) for j in range(k)]
            total += soft_ce_by_hand(sims, [alpha * math.exp(m) / z_m + (1 - alpha) * h for m, h in zip(sims_m, hard)])
        return total / B

    txt_c = torch.cat([e["text_feats_m_all"], e["text_queue"]])
    img_c = torch.cat([e["image_feats_m_all"], e["image_queue"]])
    want = 0.5 * (direction(e["image_feats"], e["image_feats_m"], txt_c) + direction(e["text_feats"], e["text_feats_m"], img_c))
    assert loss.item() == pytest.approx(want, rel=1e-9)


def test_code_queue_moves_with_the_feature_queues_and_is_required():
    loss_fn = DistillContrastiveLoss(embed_dim=4, queue_size=6, duplicate_positives=True)
    feats = [unit(3, 4, seed=i).float() for i in range(4)]
    ids = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3]])
    codes = pair_codes(["a", "b", "c"], ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="needs the pair codes"):
        loss_fn(*feats, alpha=0.0)
    loss_fn(*feats, alpha=0.0, codes=codes)
    assert torch.equal(loss_fn.code_queue.feats[:3], codes) and int(loss_fn.code_queue.ptr) == 3
    assert int(loss_fn.image_queue.ptr) == int(loss_fn.code_queue.ptr)
    # next step: the same captions again -> each local pair's queued twin (slot i) is a positive too
    queue_before = {name: loss_fn.state_dict()[f"{name}.feats"].clone() for name in ("image_queue", "text_queue")}
    loss_repeat, _ = loss_fn(*feats, alpha=0.0, codes=codes)
    positives = torch.zeros(3, 3 + 6, dtype=torch.bool)
    for i in range(3):
        positives[i, i] = positives[i, 3 + i] = True
    want, _ = distill_itc_loss(*feats, feats[2], feats[3], queue_before["image_queue"], queue_before["text_queue"],
                               loss_fn.scale(), 0.0, rank=0, positives=positives)
    assert loss_repeat.item() == pytest.approx(want.item(), rel=1e-6)
    assert "code_queue.feats" in loss_fn.state_dict()  # saved with checkpoints like the feature queues


def _two_rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    img_all, txt_all = unit(4, 4, seed=1), unit(4, 4, seed=2)
    ids_all = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3], [2, 5, 3]])  # global pairs 0 and 3 (ranks 0, 1) match
    local = slice(2 * rank, 2 * rank + 2)
    codes = pair_codes([f"i{j}" for j in range(4)][local], ids_all[local], torch.ones_like(ids_all[local]))
    loss, _ = ContrastiveLoss(temperature_init=0.5).double()(img_all[local], txt_all[local], codes)
    torch.save(loss.item(), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # 2 gloo processes
def test_duplicates_on_another_rank_are_positives(tmp_path):
    losses = run_ranks(_two_rank_worker, tmp_path)
    img, txt = unit(4, 4, seed=1), unit(4, 4, seed=2)
    targets = [[0.5, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0.5, 0, 0, 0.5]]

    def rows(q, c, r):
        return sum(soft_ce_by_hand([2.0 * float(q[i] @ c[j]) for j in range(4)], targets[i]) for i in r) / 2

    for rank, loss in enumerate(losses):
        r = range(2 * rank, 2 * rank + 2)
        assert loss == pytest.approx(0.5 * (rows(img, txt, r) + rows(txt, img, r)), rel=1e-9)
