"""The Karpathy/COCO retrieval protocol (several captions per image): hand-computed R@k in both directions, with
and without ITM re-ranking; a brute-force reference on random sets; the eval loader on both shard forms."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mmpt.data.pipeline import build_eval_loader
from mmpt.data.tokenizer import TextTokenizer, train_wordpiece
from mmpt.eval.gallery import Gallery
from mmpt.eval.retrieval import (EvalEmbeddings, EvalInputs, embed_eval_set, itm_rerank, itm_rerank_sims,
                                 rerank_scores, retrieval_metrics)
from mmpt.models.albef import build_albef
from mmpt.models.registry import preset_config

CPU = torch.device("cpu")

# 12 images x 5 captions. Image g's texts rank the other images in the cyclic order g + d_g, g + d_g - 1, ...
# (g -> g + d_g mod 12 is a bijection, so in image i's column the other images also take the values 0..11
# once); caption c of image g ranks its own image at position R[g][c] >= d_g (own score -d_g, or -R - 0.5).
D = [11, 11, 4, 1, 1, 9, 9, 6, 0, 0, 9, 11]
R = [[11] * 5, [11] * 5, [4, 4, 7, 11, 5], [1, 3, 1, 9, 2], [2, 2, 6, 3, 10], [9, 10, 9, 11, 9],
     [11, 9, 9, 9, 10], [6, 8, 6, 7, 6], [0, 0, 4, 0, 1], [3, 5, 0, 0, 2], [9] * 5, [11] * 5]
N_IMG, N_CAP = 12, 5


class OracleITM(torch.nn.Module):
    """ITM that knows the truth: pixel [0,0,0] holds the image's number, token 1 the number of the text's image."""

    def itm_score(self, images, input_ids, attention_mask):
        return (images[:, 0, 0, 0].round().long() == input_ids[:, 1]).float()


def hand_set() -> EvalEmbeddings:
    """Texts listed caption-major (c, then g) so the gallery's first-appearance order is exercised; pixels
    held for the images in a shuffled order, named by pixel_image_ids."""
    texts, images, image_ids, captions, ids = [], [], [], [], []
    for c in range(N_CAP):
        for g in range(N_IMG):
            row = torch.tensor([-float((g + D[g] - i) % N_IMG) for i in range(N_IMG)])
            row[g] = -D[g] if R[g][c] == D[g] else -R[g][c] - 0.5
            texts.append(row)
            images.append(torch.eye(N_IMG)[g])
            image_ids.append(f"img{g}")
            captions.append(f"caption {c} of image {g}")
            ids.append([2, g, 3])
    order = random.Random(0).sample(range(N_IMG), N_IMG)
    pixels = torch.zeros(N_IMG, 3, 2, 2)
    pixels[:, 0, 0, 0] = torch.tensor(order).float()
    input_ids = torch.tensor(ids)
    inputs = EvalInputs(pixels, input_ids, torch.ones_like(input_ids), pixel_image_ids=[f"img{g}" for g in order])
    keys = [f"{i:03d}" for i in range(len(texts))]
    return EvalEmbeddings(torch.stack(images), torch.stack(texts), captions, image_ids, keys, inputs)


def test_standard_protocol_hand_computed():
    """t2i first hits = R (60 texts over 12 images): rank 0: 3 (image 8) + 2 (image 9) = 5; < 5: 2 + 4 + 3 + 5
    + 4 = 18; < 10: 4 + 5 + 4 + 3 + 3 + 5 + 5 + 5 + 5 = 39. i2t first hit of image i = 5 x min_c R[i][c]
    (each image above ranks all 5 of its captions first): 55 55 20 5 10 45 45 30 0 0 45 55 -> 2, 2, 3 of 12."""
    m = retrieval_metrics(hand_set(), ks=[1, 5, 10])
    expected = {"t2i_r1": 5 / 60, "t2i_r5": 18 / 60, "t2i_r10": 39 / 60,
                "i2t_r1": 2 / 12, "i2t_r5": 2 / 12, "i2t_r10": 3 / 12}
    for name, value in expected.items():
        assert m[f"retrieval/{name}"] == pytest.approx(value), name
        assert m[f"retrieval/{name}_caption"] == pytest.approx(value), name  # every caption is distinct
    assert m["retrieval/mean"] == pytest.approx(sum(expected.values()) / 6)
    assert (m["retrieval/num_images"], m["retrieval/num_texts"], m["retrieval/num_pairs"]) == (12, 60, 60)


def test_itm_rerank_hand_computed():
    """Oracle ITM on each query's ITC top 6: a true candidate inside it moves to rank 0, one outside keeps its
    rank. t2i: the 3 + 4 + 3 + 5 + 5 = 20 texts with R < 6 (images 2, 3, 4, 8, 9) hit at 1 and 5, at 10
    still 39. i2t: images 3 (rank 5), 8, 9 (rank 0) hit at 1, 5 and 10; image 4 (rank 10) does not."""
    emb = hand_set()
    reranked = itm_rerank(OracleITM(), emb, k=6, device=CPU)
    m = retrieval_metrics(emb, ks=[1, 5, 10], prefix="retrieval_itm", rerank=reranked)
    expected = {"t2i_r1": 20 / 60, "t2i_r5": 20 / 60, "t2i_r10": 39 / 60,
                "i2t_r1": 3 / 12, "i2t_r5": 3 / 12, "i2t_r10": 3 / 12}
    for name, value in expected.items():
        assert m[f"retrieval_itm/{name}"] == pytest.approx(value), name
    assert reranked.top["t2i"].shape == (60, 6) and reranked.top["i2t"].shape == (12, 6)
    # the dense form ranks the same
    t2i, i2t = itm_rerank_sims(OracleITM(), emb, k=6, device=CPU)
    assert t2i.shape == (60, 12) and i2t.shape == (12, 60)
    dense = retrieval_metrics(emb, ks=[1, 5, 10], sims_t2i=t2i, sims_i2t=i2t, prefix="retrieval_itm")
    assert {k: dense[k] for k in m} == m


def test_rerank_fails_loudly_when_no_rank_holds_an_image():
    emb = hand_set()
    assert emb.inputs is not None and emb.inputs.pixel_image_ids is not None
    emb.inputs.pixel_image_ids[0] = "elsewhere"
    with pytest.raises(RuntimeError, match="no rank holds the pixels of 1 eval images"):
        itm_rerank(OracleITM(), emb, k=6, device=CPU)


def test_rerank_score_weight_and_confidence_gate_hand_computed():
    """Two queries, two candidates each (ITC order), ITC scale 10. Query 0: p 0.3 / 0.6, cos 0.5 / 0.45. Weight 1:
    log 0.3 + 5 = 3.796 < log 0.6 + 4.5 = 3.989 -> ITM swaps them; weight 0.5: 5 - 0.602 = 4.398 > 4.5 - 0.255 =
    4.245 -> ITC order kept. Query 1: p 0.1 / 0.4, cos 0.4 / 0.3: weight 1 gives 1.697 < 2.084 (swap), but its
    best p 0.4 is under min_itm 0.5, so the gated score is the ITC logit 4 / 3 (kept); query 0 (best p 0.6)
    is re-ranked as before."""
    p = torch.tensor([[0.3, 0.6], [0.1, 0.4]])
    cos = torch.tensor([[0.5, 0.45], [0.4, 0.3]])
    full = rerank_scores(p, cos, "itm+itc_logit", itc_scale=10.0)
    assert full.flatten().tolist() == pytest.approx([math.log(0.3) + 5, math.log(0.6) + 4.5,
                                                     math.log(0.1) + 4, math.log(0.4) + 3], abs=1e-5)
    assert full.argmax(1).tolist() == [1, 1]
    half = rerank_scores(p, cos, "itm+itc_logit", itc_scale=10.0, itm_weight=0.5)
    assert half[0].tolist() == pytest.approx([5 + 0.5 * math.log(0.3), 4.5 + 0.5 * math.log(0.6)], abs=1e-5)
    assert half.argmax(1).tolist() == [0, 0]
    gated = rerank_scores(p, cos, "itm+itc_logit", itc_scale=10.0, min_itm=0.5)
    assert gated.flatten().tolist() == pytest.approx(full[0].tolist() + [4.0, 3.0], abs=1e-5)
    assert rerank_scores(p, cos, "itm", min_itm=0.5).tolist() == p.tolist()  # ITM alone: p, never gated


def test_itm_rerank_passes_weight_and_gate_to_the_score():
    """The hand set's oracle ITM gives p 1 to the true pair and 0 to the others: a gate above 1 leaves every query
    in ITC order (the ITC metrics), a weight of 0 too; the defaults give the oracle's re-ranking (see above)."""
    emb = hand_set()
    itc = retrieval_metrics(emb, ks=[1, 5])
    for kwargs in ({"min_itm": 1.5}, {"itm_weight": 0.0}):
        reranked = itm_rerank(OracleITM(), emb, k=6, device=CPU, score="itm+itc", **kwargs)
        m = retrieval_metrics(emb, ks=[1, 5], prefix="retrieval", rerank=reranked)
        assert m == itc, kwargs
    reranked = itm_rerank(OracleITM(), emb, k=6, device=CPU, score="itm+itc", min_itm=1.0)
    m = retrieval_metrics(emb, ks=[1], prefix="retrieval_itm", rerank=reranked)
    assert m["retrieval_itm/t2i_r1"] == pytest.approx(20 / 60)


# ---- a brute-force reference: python sorts over random sets with repeated captions ----------------------


class HashITM(torch.nn.Module):
    """A fixed, pair-specific score in (0, 1): a function of the image number and the text's token 1."""

    def itm_score(self, images, input_ids, attention_mask):
        return torch.sigmoid(torch.sin(images[:, 0, 0, 0] * 1.7 + input_ids[:, 1] * 0.37) * 3)


def random_set(seed: int) -> tuple[EvalEmbeddings, list[int]]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n_img = 9
    image_emb = torch.nn.functional.normalize(torch.randn(n_img, 8, generator=g), dim=1)
    owner = [i for i in range(n_img) for _ in range(rng.randint(1, 4))]
    rng.shuffle(owner)
    n = len(owner)
    texts = torch.nn.functional.normalize(image_emb[owner] + 0.9 * torch.randn(n, 8, generator=g), dim=1)
    captions = [rng.choice(["a cat", "a dog", "two cats", "a red bus", "a bird"]) for _ in range(n)]
    ids = torch.tensor([[2, t, 3] for t in range(n)])
    pixels = torch.zeros(n_img, 3, 1, 1)
    pixels[:, 0, 0, 0] = torch.arange(n_img).float()
    inputs = EvalInputs(pixels, ids, torch.ones_like(ids), pixel_image_ids=[f"im{i}" for i in range(n_img)])
    emb = EvalEmbeddings(image_emb[owner], texts, captions, [f"im{i}" for i in owner], [f"{t:03d}" for t in range(n)],
                         inputs)
    return emb, owner


def brute_force(emb: EvalEmbeddings, owner: list[int], ks: list[int], k_rerank: int = 0,
                score: str = "itm") -> dict[str, float]:
    """Each query's candidates sorted by python; re-ranking: the ITC top k sorted by the new score, then the rest."""
    gallery_ids = list(dict.fromkeys(emb.image_ids))  # first appearance
    img_of = {f"im{i}": i for i in range(len(gallery_ids))}
    gallery = [img_of[x] for x in gallery_ids]  # gallery position -> image number
    n_txt = len(owner)
    image_vec = {owner[t]: emb.images[t] for t in range(n_txt)}
    cos = lambda t, i: float(emb.texts[t] @ image_vec[i])  # noqa: E731
    def itm(t: int, i: int) -> float:
        return float(HashITM().itm_score(torch.full((1, 3, 1, 1), float(i)), torch.tensor([[2, t, 3]]), None))

    def new(t: int, i: int) -> float:
        return itm(t, i) if score == "itm" else math.log(itm(t, i)) + cos(t, i)

    def order(pairs: list[tuple[int, int]]) -> list[int]:
        """pairs: (text, image) per candidate position -> candidate positions, best first."""
        by_itc = sorted(range(len(pairs)), key=lambda p: (-cos(*pairs[p]), p))
        top = sorted(by_itc[:k_rerank], key=lambda p: (-new(*pairs[p]), p))
        return top + by_itc[k_rerank:]

    out = {}
    for suffix, same in (("", lambda t, i: owner[t] == i),
                         ("_caption", lambda t, i: any(emb.captions[t] == emb.captions[u] for u in range(n_txt)
                                                       if owner[u] == i))):
        t2i = []
        for t in range(n_txt):
            ranked = order([(t, i) for i in gallery])
            t2i.append(next((r for r, p in enumerate(ranked) if same(t, gallery[p])), len(gallery)))
        i2t = []
        for i in gallery:
            ranked = order([(t, i) for t in range(n_txt)])
            i2t.append(next((r for r, p in enumerate(ranked) if same(p, i)), n_txt))
        for k in ks:
            out[f"t2i_r{k}{suffix}"] = sum(r < k for r in t2i) / len(t2i)
            out[f"i2t_r{k}{suffix}"] = sum(r < k for r in i2t) / len(i2t)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_reference(seed):
    emb, owner = random_set(seed)
    ks = [1, 2, 3, 5]
    m = retrieval_metrics(emb, ks)
    for name, value in brute_force(emb, owner, ks).items():
        assert m[f"retrieval/{name}"] == pytest.approx(value), name
    for score in ("itm", "itm+itc"):
        reranked = itm_rerank(HashITM(), emb, k=4, device=CPU, score=score, batch_size=5)
        m = retrieval_metrics(emb, ks, prefix="retrieval_itm", rerank=reranked)
        for name, value in brute_force(emb, owner, ks, k_rerank=4, score=score).items():
            assert m[f"retrieval_itm/{name}"] == pytest.approx(value), (score, name)


def test_gallery_first_appearance():
    gallery = Gallery.of(["b", "a", "b", "c", "a"])
    assert gallery.image_ids == ["b", "a", "c"]
    assert gallery.first_text.tolist() == [0, 1, 3]
    assert gallery.text_image.tolist() == [0, 1, 0, 2, 1]


# ---- the eval loader on real shards: one sample per image with its captions (b), one per pair (a) ---------

WORDS = "a red blue green small big cat dog bird on the left right of".split()


def caption(i: int, j: int) -> str:
    rng = random.Random(i * 10 + j)
    return " ".join(rng.choice(WORDS) for _ in range(3 + (i + j) % 4))


COUNTS = [5, 5, 3, 5, 1, 5]  # captions per image


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_wordpiece([caption(i, j) for i in range(6) for j in range(5)], vocab_size=100),
                         max_len=12)


def colour(i: int) -> tuple[int, int, int]:
    return (40 * i, 255 - 30 * i, 90 + 20 * i)


def per_image_shards(write_shards, image_bytes) -> list[str]:
    """Form (b), as `mmpt-data from-coco` writes eval shards: .txt = the first caption, .json lists them all."""
    samples = [{"__key__": f"i{i:04d}", "jpg": image_bytes(colour(i), (32, 32)), "txt": caption(i, 0),
                "json": {"image_id": f"coco{i}", "captions": [caption(i, j) for j in range(n)]}}
               for i, n in enumerate(COUNTS)]
    return write_shards([samples[:3], samples[3:]], name="per_image")


def per_pair_shards(write_shards, image_bytes) -> list[str]:
    """Form (a), as train shards are written: one sample per caption, the image_id shared."""
    samples = [{"__key__": f"p{i:04d}{j}", "jpg": image_bytes(colour(i), (32, 32)), "txt": caption(i, j),
                "json": {"image_id": f"coco{i}"}} for i, n in enumerate(COUNTS) for j in range(n)]
    return write_shards([samples[:10], samples[10:]], name="per_pair")


def test_eval_loader_expands_per_image_captions(write_shards, image_bytes, tokenizer):
    urls = per_image_shards(write_shards, image_bytes)
    bad = write_shards([[{"__key__": "bad", "jpg": image_bytes(), "txt": "x", "json": {"captions": "not a list"}}]],
                       name="bad")
    loader = build_eval_loader(urls + bad, tokenizer, batch_size=7, image_size=16, num_workers=0, rank=0, world_size=1)
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert keys[:6] == ["i0000", "i0000/1", "i0000/2", "i0000/3", "i0000/4", "i0001"]
    assert len(keys) == sum(COUNTS)
    got = sorted((iid, cap) for b in batches for iid, cap in zip(b.image_ids, b.captions))
    assert got == sorted((f"coco{i}", caption(i, j)) for i, n in enumerate(COUNTS) for j in range(n))
    first = batches[0]
    assert first.images is not None and torch.equal(first.images[0], first.images[4])  # one image, 5 pairs
    assert loader.skipped_total == {"bad_json": 1}


def test_both_shard_forms_give_the_same_metrics(write_shards, image_bytes, tokenizer):
    torch.manual_seed(0)
    model = build_albef(preset_config("albef", "tiny", vision={"image_size": 32},
                                      text={"vocab_size": 100, "max_text_len": 12}, momentum={"enabled": False}))
    results = []
    for urls in (per_image_shards(write_shards, image_bytes), per_pair_shards(write_shards, image_bytes)):
        loader = build_eval_loader(urls, tokenizer, batch_size=4, image_size=32, num_workers=0, rank=0, world_size=1)
        emb = embed_eval_set(model, loader, CPU, keep_inputs=True)
        assert emb.inputs is not None and emb.inputs.pixels.shape == (6, 3, 32, 32)  # each image held once
        m = retrieval_metrics(emb, [1, 5, 10])
        m.update(retrieval_metrics(emb, [1, 5, 10], prefix="retrieval_itm", rerank=itm_rerank(model, emb, 3, CPU)))
        results.append(m)
    assert results[0]["retrieval/num_images"] == 6 and results[0]["retrieval/num_texts"] == sum(COUNTS)
    assert results[0].keys() == results[1].keys()
    for name, value in results[0].items():
        assert results[1][name] == pytest.approx(value, abs=1e-6), name


def test_local_pixels_keep_each_image_once_and_take_the_owned():
    from mmpt.eval.pixel_store import LocalPixels

    store = LocalPixels()
    batch = torch.arange(4.0)[:, None, None, None].expand(4, 3, 2, 2)  # image value = its row
    store.add(batch, ["a", "a", "b", "c"])
    store.add(batch + 10, ["c", "d", "d", "e"])  # c seen already: the first copy stays
    assert store.ids == ["a", "b", "c", "d", "e"]
    pixels, ids = store.take({"b", "d", "e", "zzz"})
    assert ids == ["b", "d", "e"]
    assert pixels[:, 0, 0, 0].tolist() == [2.0, 11.0, 13.0] and pixels.shape == (3, 3, 2, 2)
    assert store.ids == [] and store.take(set())[0].shape[0] == 0


def test_first_hit_ranks_break_ties_in_candidate_order():
    from mmpt.eval.gallery import first_hit_ranks

    sims = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.7, 0.7], [0.9, 0.1, 0.3], [0.2, 0.2, 0.1]])
    correct = torch.tensor([[0, 0, 1], [1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    # a stable descending sort puts tied candidates in index order; no correct candidate -> 3 (never a hit)
    assert first_hit_ranks(sims, correct).tolist() == [2, 0, 1, 1, 3]
