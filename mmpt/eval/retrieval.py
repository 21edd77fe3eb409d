"""Image<->text retrieval: embed an eval set on every rank, gather, and score R@k two ways.

"pair": the retrieved item belongs to the query's own image (same image id; the sample key when the
shards carry no image_id). "caption": the retrieved item's caption string equals the query's -- the
synthetic set repeats captions, so an image whose caption is identical is an equally correct answer.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mmpt import distributed as mdist
from mmpt.data.batch import Batch
from mmpt.models.protocol import PretrainModel


@dataclass
class EvalEmbeddings:
    images: torch.Tensor  # n e, L2-normalized
    texts: torch.Tensor  # n e, L2-normalized
    captions: list[str]
    image_ids: list[str]
    keys: list[str]
    inputs: "EvalInputs | None" = None  # kept for ITM re-ranking / captioning


@dataclass
class EvalInputs:
    """The raw eval tensors, in key order (ITM needs pixels and ids, not just embeddings)."""

    pixels: torch.Tensor  # n c h w
    input_ids: torch.Tensor  # n l
    attention_mask: torch.Tensor  # n l


@torch.no_grad()
def embed_eval_set(model: PretrainModel, loader: Iterable[Batch], device: torch.device,
                   dtype: torch.dtype | None = None, keep_inputs: bool = False) -> EvalEmbeddings:
    """Collective: each rank embeds its shards, then all ranks receive everything, sorted by key.

    keep_inputs also gathers the pixels and token ids (memory: n x c x h x w on every rank) for re-ranking.
    """
    was_training = model.training
    model.eval()
    images, texts, captions, image_ids, keys = [], [], [], [], []
    pixels, ids, masks = [], [], []
    for batch in loader:
        if keep_inputs:
            pixels.append(batch.images)
            ids.append(batch.input_ids)
            masks.append(batch.attention_mask)
        batch = batch.to(device, dtype)
        images.append(model.encode_image(batch.images).float().cpu())
        texts.append(model.encode_text(batch.input_ids, batch.attention_mask).float().cpu())
        captions += batch.captions
        image_ids += batch.image_ids
        keys += batch.keys
    model.train(was_training)
    raw = (torch.cat(pixels), torch.cat(ids), torch.cat(masks)) if pixels else None
    local = (torch.cat(images) if images else None, torch.cat(texts) if texts else None, captions, image_ids, keys, raw)
    parts = [p for p in mdist.all_gather_objects(local) if p[0] is not None]  # type: ignore[index]
    if not parts:
        raise RuntimeError("the eval set is empty on every rank: check data.eval.urls")
    flat = [[x for p in parts for x in p[i]] for i in (2, 3, 4)]  # type: ignore[index]
    order = sorted(range(len(flat[2])), key=flat[2].__getitem__)
    pick = torch.tensor(order)
    captions, image_ids, keys = ([values[i] for i in order] for values in flat)
    inputs = None
    if keep_inputs:
        raws = [p[5] for p in parts]  # type: ignore[index]
        inputs = EvalInputs(*(torch.cat([r[i] for r in raws])[pick] for i in range(3)))
    return EvalEmbeddings(
        images=torch.cat([p[0] for p in parts])[pick],  # type: ignore[index]
        texts=torch.cat([p[1] for p in parts])[pick],  # type: ignore[index]
        captions=captions, image_ids=image_ids, keys=keys, inputs=inputs,
    )


def _ids(labels: list[str]) -> torch.Tensor:
    lookup: dict[str, int] = {}
    return torch.tensor([lookup.setdefault(x, len(lookup)) for x in labels])


def recall_at_k(sims: torch.Tensor, correct: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """sims, correct: `q c`. R@k = share of queries with a correct candidate among their top k."""
    order = sims.argsort(dim=1, descending=True)
    hits = torch.gather(correct, 1, order)
    first_hit = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), torch.full_like(order[:, 0], sims.shape[1]))
    return {k: (first_hit < k).float().mean().item() for k in ks}


def retrieval_metrics(emb: EvalEmbeddings, ks: list[int], sims_t2i: torch.Tensor | None = None,
                      sims_i2t: torch.Tensor | None = None, prefix: str = "retrieval") -> dict[str, float]:
    """Flat dict: {prefix}/{t2i,i2t}_r{k} (pair), ..._caption (caption identity), and the means.

    sims_t2i (`texts images`) and sims_i2t (`images texts`) default to the ITC similarities; re-ranking
    passes its own (the re-ranked orders of the two directions are not transposes of each other).
    """
    if sims_t2i is None:
        sims_t2i = emb.texts @ emb.images.T
    if sims_i2t is None:
        sims_i2t = sims_t2i.T
    out: dict[str, float] = {}
    for suffix, labels in (("", emb.image_ids), ("_caption", emb.captions)):
        ids = _ids(labels)
        same = ids[:, None] == ids[None, :]
        values = []
        for name, sims in (("t2i", sims_t2i), ("i2t", sims_i2t)):
            for k, r in recall_at_k(sims, same, ks).items():
                out[f"{prefix}/{name}_r{k}{suffix}"] = r
                values.append(r)
        out[f"{prefix}/mean{suffix}"] = sum(values) / len(values)
    out[f"{prefix}/num_pairs"] = float(len(emb.keys))
    return out


RERANK_SCORES = ("itm", "itm+itc", "itm+itc_logit")


@torch.no_grad()
def itm_rerank_sims(model: Any, emb: EvalEmbeddings, k: int, device: torch.device,
                    dtype: torch.dtype | None = None, batch_size: int = 256,
                    score: str = "itm") -> tuple[torch.Tensor, torch.Tensor]:
    """Second stage: for each query, its ITC top-k candidates are re-scored and ranked above all others.
    Collective: queries are split across ranks, results all-gathered.

    score "itm": the ITM match probability alone (ALBEF's protocol). "itm+itc": log p(match) + the ITC
    cosine, BLIP/LAVIS's ITM + ITC sum with the ITM term as a log-probability: ITM decides, and the cosine
    (within [-1, 1]) breaks near-ties that ITM is unsure about (measured on tiny ALBEF: docs/RESULTS.md).
    "itm+itc_logit": log p(match) + the ITC logit (cosine / temperature, the model's `itc.scale()`): a product
    of the two models' likelihoods, so a weak ITM cannot overrule a confident ITC ranking.
    Returns (`texts images`, `images texts`) scores whose row order is the re-ranked order.
    """
    if score not in RERANK_SCORES:
        raise ValueError(f"re-rank score {score!r}: choose one of {', '.join(RERANK_SCORES)}")
    itc_weight = float(model.itc.scale()) if score == "itm+itc_logit" else 1.0
    assert emb.inputs is not None, "embed_eval_set(..., keep_inputs=True) is needed for re-ranking"
    itc = emb.texts @ emb.images.T
    n_txt, n_img = itc.shape
    k = min(k, n_img, n_txt)
    was_training = model.training
    model.eval()
    parts = []
    for direction, sims in (("t2i", itc), ("i2t", itc.T)):
        queries = torch.arange(mdist.rank(), sims.shape[0], mdist.world_size())
        top = sims[queries].topk(k, dim=1).indices  # q k
        q_idx = queries[:, None].expand_as(top).reshape(-1)
        c_idx = top.reshape(-1)
        img_idx, txt_idx = (c_idx, q_idx) if direction == "t2i" else (q_idx, c_idx)
        scores = []
        for start in range(0, len(q_idx), batch_size):
            sl = slice(start, start + batch_size)
            pixels = emb.inputs.pixels[img_idx[sl]].to(device, dtype)
            scores.append(model.itm_score(pixels, emb.inputs.input_ids[txt_idx[sl]].to(device),
                                          emb.inputs.attention_mask[txt_idx[sl]].to(device)).float().cpu())
        itm = torch.cat(scores).view(-1, k) if scores else torch.empty(0, k)
        if score != "itm":
            itm = itm.clamp_min(1e-12).log() + itc_weight * sims[queries[:, None].expand_as(top), top]
        local = (direction, queries, top, itm)
        parts += mdist.all_gather_objects(local)
    model.train(was_training)
    # Re-scored candidates go above the rest: shift each query's k scores so their minimum sits above 1,
    # the largest ITC cosine (a per-row shift keeps their order and never loses float precision).
    reranked = {"t2i": itc.clone(), "i2t": itc.T.clone()}
    for direction, queries, top, scores in parts:  # type: ignore[misc]
        rows = reranked[direction]
        rows[queries[:, None].expand_as(top), top] = scores - scores.amin(dim=1, keepdim=True) + 2.0
    return reranked["t2i"], reranked["i2t"]
