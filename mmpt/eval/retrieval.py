"""Image<->text retrieval: embed an eval set on every rank, gather, and score R@k two ways.

"pair": the retrieved item belongs to the query's own image (same image id; the sample key when the
shards carry no image_id). "caption": the retrieved item's caption string equals the query's -- the
synthetic set repeats captions, so an image whose caption is identical is an equally correct answer.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mmpt import distributed as mdist
from mmpt.data.batch import Batch


@dataclass
class EvalEmbeddings:
    images: torch.Tensor  # n e, L2-normalized
    texts: torch.Tensor  # n e, L2-normalized
    captions: list[str]
    image_ids: list[str]
    keys: list[str]


@torch.no_grad()
def embed_eval_set(model: torch.nn.Module, loader: Iterable[Batch], device: torch.device,
                   dtype: torch.dtype | None = None) -> EvalEmbeddings:
    """Collective: each rank embeds its shards, then all ranks receive everything, sorted by key."""
    was_training = model.training
    model.eval()
    images, texts, captions, image_ids, keys = [], [], [], [], []
    for batch in loader:
        batch = batch.to(device, dtype)
        images.append(model.encode_image(batch.images).float().cpu())
        texts.append(model.encode_text(batch.input_ids, batch.attention_mask).float().cpu())
        captions += batch.captions
        image_ids += batch.image_ids
        keys += batch.keys
    model.train(was_training)
    local = (torch.cat(images) if images else None, torch.cat(texts) if texts else None, captions, image_ids, keys)
    parts = [p for p in mdist.all_gather_objects(local) if p[0] is not None]  # type: ignore[index]
    if not parts:
        raise RuntimeError("the eval set is empty on every rank: check data.eval.urls")
    flat = [[x for p in parts for x in p[i]] for i in (2, 3, 4)]  # type: ignore[index]
    order = sorted(range(len(flat[2])), key=flat[2].__getitem__)
    pick = torch.tensor(order)
    captions, image_ids, keys = ([values[i] for i in order] for values in flat)
    return EvalEmbeddings(
        images=torch.cat([p[0] for p in parts])[pick],  # type: ignore[index]
        texts=torch.cat([p[1] for p in parts])[pick],  # type: ignore[index]
        captions=captions, image_ids=image_ids, keys=keys,
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


def retrieval_metrics(emb: EvalEmbeddings, ks: list[int]) -> dict[str, float]:
    """Flat dict: retrieval/{t2i,i2t}_r{k} (pair), ..._caption (caption identity), and the means."""
    sims_t2i = emb.texts @ emb.images.T  # text queries x image candidates
    out: dict[str, float] = {}
    for suffix, labels in (("", emb.image_ids), ("_caption", emb.captions)):
        ids = _ids(labels)
        same = ids[:, None] == ids[None, :]
        values = []
        for name, sims in (("t2i", sims_t2i), ("i2t", sims_t2i.T)):
            for k, r in recall_at_k(sims, same, ks).items():
                out[f"retrieval/{name}_r{k}{suffix}"] = r
                values.append(r)
        out[f"retrieval/mean{suffix}"] = sum(values) / len(values)
    out["retrieval/num_pairs"] = float(len(emb.keys))
    return out
