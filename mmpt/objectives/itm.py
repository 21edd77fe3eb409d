"""Image-text matching: hard-negative sampling over the global batch, labels and loss.

For every local image one negative text, and for every local text one negative image, is drawn with
probability softmax(similarity) over the all-gathered batch, never the positive nor any pair that shares
the image id (two captions of one image are not a mismatch). Both draws are one torch.multinomial over a
`(2 b) (w b)` matrix: no Python loop over the batch and no host sync.

`hard_negative_rows` is the whole model-independent step that ALBEF and VLMo share: codes for the
exclusion rules, the no-grad draw over all-gathered ITC features, and the rows of whatever each model
feeds its fused pass (ALBEF: tower tokens; VLMo: raw images and token ids), picked locally or across ranks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmpt.distributed import all_gather_no_grad, gather_rows, rank
from mmpt.objectives.pair_codes import pair_image_codes, text_codes

__all__ = ["HardNegatives", "hard_negative_rows", "hardness_ramp", "itm_labels", "itm_loss", "sample_hard_negatives"]


def _negative_weights(
    sim: torch.Tensor, same_id: torch.Tensor, positive: torch.Tensor, hardness: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Row-stochastic `b n` weights: hardness x softmax over allowed columns + (1 - hardness) x uniform over them.

    Allowed = not the same image id; a row with no such column (the whole global batch shows one image)
    falls back to every column but its positive. Softmax is taken with disallowed columns at -inf, so the
    allowed ones can never all underflow to zero; non-finite similarities fall back to uniform. Why a mixture
    and not a softer softmax: scaling the ITC logits (scale ~14 early) makes every draw hard long before a
    tiny fusion encoder has learnt anything, while a mixture keeps a (1 - hardness) share of easy negatives
    (docs/RESULTS.md, "Why tiny ITM sits at its prior").
    """
    allowed = ~same_id
    allowed = torch.where(allowed.any(dim=1, keepdim=True), allowed, ~positive)  # `b n`
    weights = sim.float().masked_fill(~allowed, float("-inf")).softmax(dim=1)
    bad = ~torch.isfinite(weights).all(dim=1, keepdim=True) | ~(weights.sum(dim=1, keepdim=True) > 0)
    uniform = allowed.float() / allowed.sum(dim=1, keepdim=True)
    mixed = hardness * weights.nan_to_num(0.0) + (1.0 - hardness) * uniform
    return torch.where(bad, uniform, mixed)


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_ids_local: torch.Tensor | None,
    image_ids_global: torch.Tensor | None,
    rank: int,
    generator: torch.Generator | None = None,
    text_codes_local: torch.Tensor | None = None,
    text_codes_global: torch.Tensor | None = None,
    hardness: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices of one hard negative text per local image and one hard negative image per local text.

    sim_i2t: `b (w b)` local images vs all texts; sim_t2i: `b (w b)` local texts vs all images (scaled
    similarities, i.e. ITC logits; detached here). image_ids_local `b` / image_ids_global `(w b)`: int
    codes (`image_id_codes`); None means every pair is a distinct image. text_codes_* (`text_codes`): pairs
    whose captions are identical are excluded too -- an identical caption is a positive in disguise (web data
    repeats captions; the synthetic set repeats them by design). The positive of local row i is column
    b*rank + i. hardness in [0, 1] (0-d tensor or float): the share of each draw that follows softmax(sim),
    the rest is uniform over the allowed columns (`hardness_ramp`). Returns (neg_text_idx `b`, neg_image_idx
    `b`), int64 indices into the global batch.
    """
    b, n = sim_i2t.shape
    if sim_t2i.shape != (b, n):
        raise ValueError(f"sim_i2t {tuple(sim_i2t.shape)} and sim_t2i {tuple(sim_t2i.shape)} must both be `b (w b)`")
    if n < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 pairs")
    device = sim_i2t.device
    positive = F.one_hot(torch.arange(b, device=device) + b * rank, n).bool()  # `b (w b)`
    if image_ids_local is None or image_ids_global is None:
        same_id = positive
    else:
        same_id = (image_ids_local.to(device)[:, None] == image_ids_global.to(device)[None, :]) | positive
    if text_codes_local is not None and text_codes_global is not None:
        same_id = same_id | (text_codes_local.to(device)[:, None] == text_codes_global.to(device)[None, :])
    with torch.no_grad():
        # Text i and image i share the image id, so one `same_id` mask serves both directions.
        weights = torch.cat([_negative_weights(sim_i2t, same_id, positive, hardness),
                             _negative_weights(sim_t2i, same_id, positive, hardness)])  # `(2 b) (w b)`
        drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # `(2 b)`
    return drawn[:b], drawn[b:]


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`(3 b)` labels for logits ordered [positives ; image-with-negative-text ; text-with-negative-image]."""
    return torch.cat([torch.ones(batch_size, dtype=torch.long, device=device),
                      torch.zeros(2 * batch_size, dtype=torch.long, device=device)])


def itm_loss(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE of the 2-way ITM head: logits_pos `b 2` (matched), logits_neg `(2 b) 2` (both negative kinds).

    Class 1 = match. Returns (loss, metrics); metrics are detached 0-d tensors (no host sync).
    """
    b = logits_pos.shape[0]
    if logits_neg.shape[0] != 2 * b:
        raise ValueError(f"expected 2*{b} negative logits, got {logits_neg.shape[0]}")
    logits = torch.cat([logits_pos, logits_neg])  # `(3 b) 2`
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = itm_labels(b, logits.device)
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        pred = logits.argmax(dim=1)
        metrics = {"itm_acc": (pred == labels).float().mean(), "itm_acc_pos": (pred[:b] == 1).float().mean()}
    return loss, metrics


def hardness_ramp(step: torch.Tensor, warmup_steps: int) -> torch.Tensor:
    """0-d device tensor in [0, 1]: the share of hard-negative draws that follow softmax(sim), the rest being
    uniform (`_negative_weights`): step / warmup, clamped (0 = uniform negatives, 1 = softmax(sim) as
    ALBEF/VLMo); 1 when warmup_steps <= 0. `step` is a `(1,)` buffer of optimizer steps, read on device (no
    host sync). A tiny model trained from scratch never bootstraps ITM on fully hard negatives (it sits at the
    1/3 prior), hence the ramp."""
    if warmup_steps <= 0:
        return torch.ones((), device=step.device)
    return (step[0].float() / warmup_steps).clamp(max=1.0)


class HardNegatives(NamedTuple):
    """Rows of the negative partners, one tensor per input given to `hard_negative_rows`, in that order.

    images[k]: row i holds `image_rows[k]` of the hard negative image of local text i, `b ...`;
    texts[k]: row i holds `text_rows[k]` of the hard negative text of local image i, `b ...`.
    """

    images: tuple[torch.Tensor, ...]
    texts: tuple[torch.Tensor, ...]


def hard_negative_rows(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    logit_scale: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: Sequence[str],
    image_rows: Sequence[torch.Tensor],
    text_rows: Sequence[torch.Tensor],
    global_negatives: bool = True,
    hardness: torch.Tensor | float = 1.0,
) -> HardNegatives:
    """Draw one hard negative text per local image and one hard negative image per local text, then pick
    the rows the model's fused pass needs for them.

    image_feats / text_feats: the local L2-normalised ITC features `b e` (detached here); logit_scale: 0-d,
    the ITC scale; hardness: the softmax share of each draw (`hardness_ramp`). input_ids / attention_mask
    `b l` give the caption codes (identical captions are never each other's negatives), image_ids the image codes (two
    captions of one image are not a mismatch). image_rows / text_rows: tensors `b ...` whose rows belong to
    the local images / texts (e.g. `[images]`, `[input_ids, attention_mask]`).

    global_negatives=True draws from the all-gathered batch; a partner owned by this rank keeps its gradient,
    one owned by another rank arrives through a no-grad gather (`gather_rows`). False draws from the local
    batch only (no collective). Collective when global: every rank calls it with the same shapes.
    """
    b = image_feats.shape[0]
    codes = pair_image_codes(image_ids, b, image_feats.device)
    captions = text_codes(attention_mask * input_ids)
    with torch.no_grad():
        img, txt = image_feats.detach().float(), text_feats.detach().float()
        gather = all_gather_no_grad if global_negatives else (lambda t: t)
        img_all, txt_all = gather(img), gather(txt)
        s = logit_scale.detach()
        neg_text, neg_image = sample_hard_negatives(
            s * img @ txt_all.T, s * txt @ img_all.T, codes, gather(codes), rank() if global_negatives else 0,
            text_codes_local=captions, text_codes_global=gather(captions), hardness=hardness,
        )  # fmt: skip
    pick = gather_rows if global_negatives else (lambda local, index: local[index])
    texts = tuple(pick(t, neg_text) for t in text_rows)
    images = tuple(pick(t, neg_image) for t in image_rows)
    return HardNegatives(images=images, texts=texts)
