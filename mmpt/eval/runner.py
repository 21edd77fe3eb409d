"""Everything `eval` means for a model, decided by what the model can do (its protocol extras):

- always: ITC retrieval (`retrieval/...`, the Karpathy/COCO protocol: mmpt.eval.retrieval), with the eval samples
  the loader skipped (`retrieval/skipped`, and `retrieval/skipped_<reason>` per reason);
- `itm_score`: ITM re-ranking of the ITC top-k (`retrieval_itm/...`), ALBEF's second stage;
- `generate`: captioning of the eval images, BLEU-4 and CIDEr-D against their captions (`caption/...`),
  plus a few sample rows (image, generated, reference) for a W&B table;
- `eval.zeroshot.root|urls` set: zero-shot image classification (`zeroshot/...`), for every architecture.
Retrieval and captioning need an eval loader (data.eval.urls); without one only zero-shot runs.
Collective: every rank must call it.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmpt import distributed as mdist
from mmpt.data.batch import Batch
from mmpt.data.tokenizer import TextTokenizer
from mmpt.eval.caption_metrics import caption_scores
from mmpt.eval import zeroshot
from mmpt.eval.retrieval import EvalEmbeddings, embed_eval_set, itm_rerank, retrieval_metrics
from mmpt.models.protocol import PretrainModel, has_capability

log = logging.getLogger(__name__)


@dataclass
class CaptionSample:
    image: np.ndarray  # h w c uint8
    generated: str
    reference: str


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[CaptionSample] = field(default_factory=list)


def to_uint8(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation of one `c h w` image for display."""
    img = pixels.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def caption_eval(model: Any, emb: EvalEmbeddings, tokenizer: TextTokenizer, device: torch.device,
                 dtype: torch.dtype | None, max_images: int, max_len: int, num_beams: int,
                 num_samples: int, mean: Sequence[float], std: Sequence[float],
                 batch_size: int = 64) -> EvalResult:
    """Generate for the first `max_images` distinct images (key order); references = every eval caption of
    that image id. Collective: each rank captions the chosen images whose pixels it holds, and only strings
    (and the few sample images) are gathered."""
    assert emb.inputs is not None
    refs: dict[str, list[str]] = {}
    for image_id, caption in zip(emb.image_ids, emb.captions):
        refs.setdefault(image_id, []).append(caption)
    chosen = list(refs)[:max_images]
    row_of = emb.inputs.pixel_rows(emb.image_ids)
    mine = [(image_id, row_of[image_id]) for image_id in chosen if image_id in row_of]
    was_training = model.training
    model.eval()
    local: dict[str, str] = {}
    for start in range(0, len(mine), batch_size):
        rows = mine[start: start + batch_size]
        pixels = emb.inputs.pixels[torch.tensor([i for _, i in rows])].to(device, dtype)
        strategy = "beam" if num_beams > 1 else "greedy"
        ids = model.generate(pixels, max_len=max_len, strategy=strategy, num_beams=num_beams).cpu()
        for (image_id, _), row in zip(rows, ids.tolist()):
            local[image_id] = tokenizer.decode(row)
    model.train(was_training)
    shown = {image_id: to_uint8(emb.inputs.pixels[row_of[image_id]], mean, std)
             for image_id in chosen[:num_samples] if image_id in local}
    gathered: dict[str, str] = {}
    images: dict[str, np.ndarray] = {}
    for part_hyps, part_images in mdist.all_gather_objects((local, shown)):  # type: ignore[misc]
        gathered.update(part_hyps)
        images.update(part_images)
    hyps = {image_id: gathered[image_id] for image_id in chosen if image_id in gathered}  # order: any rank count
    metrics = caption_scores({k: refs[k] for k in hyps}, hyps)
    metrics["caption/num_images"] = float(len(hyps))
    samples = [CaptionSample(images[image_id], hyps[image_id], refs[image_id][0])
               for image_id in chosen[:num_samples] if image_id in images]
    return EvalResult(metrics, samples)


def skipped_metrics(loader: Iterable[Batch]) -> dict[str, float]:
    """Eval samples skipped on all ranks (a `BatchLoader`'s `skipped_total` after its pass), total and by reason,
    so a score computed on fewer samples than the set holds says so. Collective."""
    total: Counter[str] = Counter()
    for part in mdist.all_gather_objects(dict(getattr(loader, "skipped_total", {}))):
        total.update(part)  # type: ignore[arg-type]
    if total and mdist.rank() == 0:
        log.warning("eval: %d sample(s) skipped (%s)", sum(total.values()), dict(sorted(total.items())))
    out = {"retrieval/skipped": float(sum(total.values()))}
    out.update({f"retrieval/skipped_{reason}": float(n) for reason, n in sorted(total.items())})
    return out


def evaluate_model(model: PretrainModel, loader: Iterable[Batch] | None, tokenizer: TextTokenizer, eval_cfg,
                   device: torch.device, dtype: torch.dtype | None, mean: Sequence[float],
                   std: Sequence[float], image_size: int | None = None, source: str = "") -> EvalResult:
    """eval_cfg: mmpt.engine.config.EvalConfig (ks, rerank_k, caption_* settings, zeroshot). loader None: no
    retrieval/captioning. image_size: the eval transform's (zero-shot images); source: the checkpoint's name
    in the clip_benchmark JSON."""
    result = EvalResult({})
    if loader is not None:
        result = _retrieval_and_captions(model, loader, tokenizer, eval_cfg, device, dtype, mean, std)
    zs = getattr(eval_cfg, "zeroshot", None)
    if zeroshot.enabled(zs):
        if image_size is None:
            raise ValueError("evaluate_model: zero-shot needs the eval image_size")
        scores = zeroshot.zeroshot_eval(model, tokenizer, zs, image_size, mean, std, device, dtype).metrics
        result.metrics.update(scores)
        if zs.output and mdist.rank() == 0:
            cfg = getattr(model, "config", None)
            name = f"{getattr(cfg, 'arch', type(model).__name__)}/{getattr(cfg, 'preset', None) or 'custom'}"
            zeroshot.write_clip_benchmark_json(zs, scores, name, source)
    return result


def _retrieval_and_captions(model: PretrainModel, loader: Iterable[Batch], tokenizer: TextTokenizer, eval_cfg,
                            device: torch.device, dtype: torch.dtype | None, mean: Sequence[float],
                            std: Sequence[float]) -> EvalResult:
    can_rerank = has_capability(model, "itm_score") and eval_cfg.rerank_k > 0
    can_caption = has_capability(model, "generate") and eval_cfg.caption_max_images > 0
    emb = embed_eval_set(model, loader, device, dtype, keep_inputs=can_rerank or can_caption)
    metrics = retrieval_metrics(emb, eval_cfg.ks)
    metrics.update(skipped_metrics(loader))
    result = EvalResult(metrics)
    if can_rerank:
        reranked = itm_rerank(model, emb, eval_cfg.rerank_k, device, dtype, score=eval_cfg.rerank_score,
                              itm_weight=eval_cfg.rerank_itm_weight, min_itm=eval_cfg.rerank_min_itm)
        metrics.update(retrieval_metrics(emb, eval_cfg.ks, prefix="retrieval_itm", rerank=reranked))
    if can_caption:
        captions = caption_eval(model, emb, tokenizer, device, dtype, eval_cfg.caption_max_images,
                                eval_cfg.caption_max_len, eval_cfg.caption_beams, eval_cfg.caption_samples, mean, std)
        metrics.update(captions.metrics)
        result.samples = captions.samples
    return result
