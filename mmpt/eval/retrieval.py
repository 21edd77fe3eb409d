"""Image<->text retrieval with the Karpathy/COCO protocol: embed an eval set on every rank, gather the
embeddings, score R@k, and optionally re-rank each query's ITC top-k with ITM.

text->image ranks the unique images (a hit when the caption's own image is in the top k); image->text ranks
all captions (a hit when any caption of the image is in the top k). The "_caption" metrics count a candidate
whose caption string equals the query's as correct too (mmpt.eval.gallery explains both). With one caption
per image the galleries are the old one-row-per-pair ones.

Scale (COCO 5k: 5,000 images x 25,000 captions, ITM on the top 128 of each query): only embeddings and token
ids travel between ranks; every image's pixels stay on the rank that read them, and a candidate pair is
scored there. Why that split: it is exact (every pair is scored once, by one fixed rank, so N ranks give
the 1-rank metrics), reads the shards once, moves no pixels, and bounds each rank's pixel memory by its own
slice of the eval set; the re-ranking work splits with the images. What every rank holds besides: the
embeddings and token ids of the whole set, and the (texts + images) x k candidates and scores of the
re-ranking (COCO, k = 128: ~3.8 million pairs, ~50 MB).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mmpt import distributed as mdist
from mmpt.data.batch import Batch
from mmpt.eval.gallery import (EvalEmbeddings, EvalInputs, Gallery, Labels, Reranked, ScoreRows, label_codes,
                               first_hit_ranks, itc_rows, query_blocks)
from mmpt.eval.pixel_store import LocalPixels, release_freed_memory
from mmpt.models.protocol import PretrainModel

__all__ = ["EvalEmbeddings", "EvalInputs", "embed_eval_set", "recall_at_k", "retrieval_metrics", "itm_rerank",
           "itm_rerank_sims", "rerank_scores", "RERANK_SCORES"]


@torch.no_grad()
def embed_eval_set(model: PretrainModel, loader: Iterable[Batch], device: torch.device,
                   dtype: torch.dtype | None = None, keep_inputs: bool = False) -> EvalEmbeddings:
    """Collective: each rank embeds its shards, then all ranks receive every embedding, sorted by key.

    An image repeated in a batch (one sample per caption) is encoded once. keep_inputs also gathers the token
    ids (`n l`, small) and keeps the pixels of the images this rank owns (an image read by several ranks
    belongs to the lowest of them) for re-ranking and captioning; pixels are never gathered.
    """
    was_training = model.training
    model.eval()
    images, texts, captions, image_ids, keys = [], [], [], [], []
    ids, masks = [], []
    local_pixels = LocalPixels()
    for batch in loader:
        if len(batch.image_ids) != len(batch):
            raise ValueError(f"an eval batch of {len(batch)} rows has {len(batch.image_ids)} image ids "
                             "(the eval loader gives one per row: the json image_id, else the sample key)")
        first: dict[str, int] = {}
        for i, image_id in enumerate(batch.image_ids):
            first.setdefault(image_id, i)
        position = {image_id: j for j, image_id in enumerate(first)}
        expand = torch.tensor([position[x] for x in batch.image_ids]) if len(first) < len(batch) else None
        if keep_inputs:
            ids.append(batch.input_ids)
            masks.append(batch.attention_mask)
            assert batch.images is not None
            local_pixels.add(batch.images, batch.image_ids)
        batch = batch.to(device, dtype)
        assert batch.images is not None and batch.input_ids is not None and batch.attention_mask is not None
        if expand is None:
            images.append(model.encode_image(batch.images).float().cpu())
        else:
            unique_rows = torch.tensor(list(first.values()), device=device)
            images.append(model.encode_image(batch.images[unique_rows]).float().cpu()[expand])
        texts.append(model.encode_text(batch.input_ids, batch.attention_mask).float().cpu())
        captions += batch.captions
        image_ids += batch.image_ids
        keys += batch.keys
        del batch
        release_freed_memory()  # mmpt.eval.pixel_store: else each freed batch stays resident as a heap hole
    model.train(was_training)
    tokens = (torch.cat(ids), torch.cat(masks)) if ids else None
    local = (torch.cat(images) if images else None, torch.cat(texts) if texts else None, captions, image_ids, keys,
             tokens)
    parts = [p for p in mdist.all_gather_objects(local) if p[0] is not None]  # type: ignore[index]
    if not parts:
        raise RuntimeError("the eval set is empty on every rank: check data.eval.urls")
    flat = [[x for p in parts for x in p[i]] for i in (2, 3, 4)]  # type: ignore[index]
    order = sorted(range(len(flat[2])), key=flat[2].__getitem__)
    pick = torch.tensor(order)
    captions, image_ids, keys = ([values[i] for i in order] for values in flat)
    inputs = None
    if keep_inputs:
        owner: dict[str, int] = {}
        for r, part in enumerate(mdist.all_gather_objects(local_pixels.ids)):
            for image_id in part:  # type: ignore[union-attr]
                owner.setdefault(image_id, r)
        pixels, mine = local_pixels.take({i for i in local_pixels.ids if owner[i] == mdist.rank()})
        raws = [p[5] for p in parts]  # type: ignore[index]
        inputs = EvalInputs(pixels, *(torch.cat([r[i] for r in raws])[pick] for i in range(2)), pixel_image_ids=mine)
    return EvalEmbeddings(
        images=torch.cat([p[0] for p in parts])[pick],  # type: ignore[index]
        texts=torch.cat([p[1] for p in parts])[pick],  # type: ignore[index]
        captions=captions, image_ids=image_ids, keys=keys, inputs=inputs,
    )


def recall_at_k(sims: torch.Tensor, correct: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """sims, correct: `q c`. R@k = share of queries with a correct candidate among their top k."""
    first_hit = first_hit_ranks(sims, correct)
    return {k: (first_hit < k).float().mean().item() for k in ks}


def _dense(sims_t2i: torch.Tensor, sims_i2t: torch.Tensor) -> ScoreRows:
    def rows(direction: str, start: int, end: int) -> torch.Tensor:
        return (sims_t2i if direction == "t2i" else sims_i2t)[start:end]

    return rows


def retrieval_metrics(emb: EvalEmbeddings, ks: list[int], sims_t2i: torch.Tensor | None = None,
                      sims_i2t: torch.Tensor | None = None, prefix: str = "retrieval",
                      rerank: Reranked | None = None) -> dict[str, float]:
    """Flat dict: {prefix}/{t2i,i2t}_r{k} (standard protocol), ..._caption (caption identity), the means,
    num_images, num_texts and num_pairs (= num_texts, the older name).

    Scores default to the ITC cosines, with `rerank`'s re-scored candidates placed on top; sims_t2i
    (`texts images`) and sims_i2t (`images texts`, images = the unique images in order of first appearance)
    replace them whole (small sets, tests).
    """
    gallery = Gallery.of(emb.image_ids)
    if sims_t2i is not None or sims_i2t is not None:
        t2i = sims_t2i if sims_t2i is not None else emb.texts @ emb.images[gallery.first_text].T
        rows = _dense(t2i, sims_i2t if sims_i2t is not None else t2i.T)
    else:
        rows = itc_rows(emb, gallery)
        if rerank is not None:
            rows = rerank.over(rows)
    n_txt, n_img = len(emb.image_ids), len(gallery)
    out: dict[str, float] = {}
    for suffix, text_label in (("", gallery.text_image), ("_caption", label_codes(emb.captions))):
        labels = Labels.of(gallery, text_label)
        values = []
        for name, n_queries, n_candidates in (("t2i", n_txt, n_img), ("i2t", n_img, n_txt)):
            hits = []
            for start, end in query_blocks(n_queries, n_candidates):
                if name == "t2i":
                    correct = labels.t2i_correct(torch.arange(start, end))
                else:
                    correct = labels.i2t_correct(start, end)
                hits.append(first_hit_ranks(rows(name, start, end), correct))
            first_hit = torch.cat(hits)
            for k in ks:
                out[f"{prefix}/{name}_r{k}{suffix}"] = (first_hit < k).float().mean().item()
                values.append(out[f"{prefix}/{name}_r{k}{suffix}"])
        out[f"{prefix}/mean{suffix}"] = sum(values) / len(values)
    out[f"{prefix}/num_images"] = float(n_img)
    out[f"{prefix}/num_texts"] = float(n_txt)
    out[f"{prefix}/num_pairs"] = float(n_txt)
    return out


RERANK_SCORES = ("itm", "itm+itc", "itm+itc_logit")


def _itc_top_k(rows: ScoreRows, direction: str, n_queries: int, n_candidates: int,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's k best candidates by cosine: (values, indices), both `q k`."""
    values, indices = [], []
    for start, end in query_blocks(n_queries, n_candidates):
        top = rows(direction, start, end).topk(k, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


@torch.no_grad()
def _score_owned_pairs(model: Any, inputs: EvalInputs, gallery: Gallery, image_ids: list[str],
                       pair_image: torch.Tensor, pair_text: torch.Tensor, device: torch.device,
                       dtype: torch.dtype | None, batch_size: int) -> torch.Tensor:
    """Collective: ITM probability of every (gallery image, text) pair, each scored on the rank holding the
    image's pixels, gathered to all ranks. Returns `p` float (pair order)."""
    row_of = inputs.pixel_rows(image_ids)
    local_row = torch.tensor([row_of.get(i, -1) for i in gallery.image_ids], dtype=torch.long)  # n_img
    mine = (local_row[pair_image] >= 0).nonzero().squeeze(1)
    scores = []
    for start in range(0, len(mine), batch_size):
        sel = mine[start:start + batch_size]
        pixels = inputs.pixels[local_row[pair_image[sel]]].to(device, dtype)
        txt = pair_text[sel]
        scores.append(model.itm_score(pixels, inputs.input_ids[txt].to(device),
                                      inputs.attention_mask[txt].to(device)).float().cpu())
        del pixels
        release_freed_memory()
    local = (mine, torch.cat(scores) if scores else torch.empty(0))
    out = torch.full((len(pair_image),), float("nan"))
    for where, values in mdist.all_gather_objects(local):  # type: ignore[misc]
        out[where] = values
    if out.isnan().any():
        missing = sorted({gallery.image_ids[i] for i in pair_image[out.isnan()].tolist()})
        raise RuntimeError(f"no rank holds the pixels of {len(missing)} eval images to re-rank (e.g. {missing[:3]})")
    return out


@torch.no_grad()
def itm_rerank(model: Any, emb: EvalEmbeddings, k: int, device: torch.device, dtype: torch.dtype | None = None,
               batch_size: int = 256, score: str = "itm", itm_weight: float = 1.0, min_itm: float = 0.0) -> Reranked:
    """Second stage: each query's ITC top-k candidates are re-scored and ranked above all others; t2i queries
    are the texts over the unique images, i2t queries the images over all texts. Collective.

    A pair found by both directions is scored once, on the rank that holds its image (module docstring).
    score "itm": the ITM match probability alone (ALBEF's protocol). "itm+itc": log p(match) + the ITC
    cosine, BLIP/LAVIS's ITM + ITC sum with the ITM term as a log-probability: ITM decides, and the cosine
    (within [-1, 1]) breaks near-ties that ITM is unsure about (measured on tiny ALBEF: docs/RESULTS.md).
    "itm+itc_logit": log p(match) + the ITC logit (cosine / temperature, the model's `itc.scale()`): a product
    of the two models' likelihoods, so a weak ITM cannot overrule a confident ITC ranking.
    itm_weight and min_itm: `rerank_scores`.
    """
    if score not in RERANK_SCORES:
        raise ValueError(f"re-rank score {score!r}: choose one of {', '.join(RERANK_SCORES)}")
    assert emb.inputs is not None, "embed_eval_set(..., keep_inputs=True) is needed for re-ranking"
    itc_scale = float(model.itc.scale()) if score == "itm+itc_logit" else 1.0
    gallery = Gallery.of(emb.image_ids)
    rows = itc_rows(emb, gallery)
    n_txt, n_img = len(emb.image_ids), len(gallery)
    cos, top = {}, {}
    cos["t2i"], top["t2i"] = _itc_top_k(rows, "t2i", n_txt, n_img, min(k, n_img))
    cos["i2t"], top["i2t"] = _itc_top_k(rows, "i2t", n_img, n_txt, min(k, n_txt))
    k_t2i, k_i2t = top["t2i"].shape[1], top["i2t"].shape[1]
    pair_image = torch.cat([top["t2i"].reshape(-1), torch.arange(n_img).repeat_interleave(k_i2t)])
    pair_text = torch.cat([torch.arange(n_txt).repeat_interleave(k_t2i), top["i2t"].reshape(-1)])
    distinct, which = (pair_image * n_txt + pair_text).unique(return_inverse=True)
    was_training = model.training
    model.eval()
    itm = _score_owned_pairs(model, emb.inputs, gallery, emb.image_ids, distinct // n_txt, distinct % n_txt,
                             device, dtype, batch_size)[which]
    model.train(was_training)
    placed = {}
    for direction, scores in (("t2i", itm[:n_txt * k_t2i].view(n_txt, k_t2i)),
                              ("i2t", itm[n_txt * k_t2i:].view(n_img, k_i2t))):
        scores = rerank_scores(scores, cos[direction], score, itc_scale, itm_weight, min_itm)
        # shift each query's k scores so their minimum sits above 1, the largest cosine (a per-row shift
        # keeps their order and never loses float precision)
        placed[direction] = scores - scores.amin(dim=1, keepdim=True) + 2.0
    return Reranked(top, placed)


def rerank_scores(itm: torch.Tensor, cos: torch.Tensor, score: str, itc_scale: float = 1.0,
                  itm_weight: float = 1.0, min_itm: float = 0.0) -> torch.Tensor:
    """The second-stage score of each query's ITC top-k candidates (`q k`, higher first); itm: p(match), cos: the
    ITC cosines, both `q k`. "itm": p alone; otherwise itm_weight * log p + itc_scale * cos (itc_scale: 1 for
    "itm+itc", the ITC logit scale for "itm+itc_logit"). min_itm: a query whose best p is below it keeps its
    ITC order (scores = itc_scale * cos): an ITM that matches none of the candidates has nothing to add, and
    on tiny models its near-prior p only shuffles near-ties (measured: docs/RESULTS.md, issue 11)."""
    if score == "itm":
        scores = itm
    else:
        itc = itc_scale * cos
        scores = itm_weight * itm.clamp_min(1e-12).log() + itc
        unsure = itm.amax(dim=1, keepdim=True) < min_itm
        scores = torch.where(unsure, itc, scores)
    return scores


def itm_rerank_sims(model: Any, emb: EvalEmbeddings, k: int, device: torch.device,
                    dtype: torch.dtype | None = None, batch_size: int = 256,
                    score: str = "itm", itm_weight: float = 1.0,
                    min_itm: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`itm_rerank` as dense (`texts images`, `images texts`) score matrices, for small sets and tests
    (COCO-size sets pass the `Reranked` to retrieval_metrics instead)."""
    reranked = itm_rerank(model, emb, k, device, dtype, batch_size, score, itm_weight, min_itm)
    gallery = Gallery.of(emb.image_ids)
    rows = reranked.over(itc_rows(emb, gallery))
    return rows("t2i", 0, len(emb.image_ids)), rows("i2t", 0, len(gallery))
