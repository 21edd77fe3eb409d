"""Image-text matching: hard-negative sampling over the global batch, labels and loss.

For every local image one negative text, and for every local text one negative image, is drawn with
probability softmax(similarity) over the all-gathered batch, never the positive nor any pair that shares
the image id (two captions of one image are not a mismatch). Both draws are one torch.multinomial over a
`(2 b) (w b)` matrix: no Python loop over the batch and no host sync.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def image_id_codes(image_ids: Sequence[str | int], device: torch.device | str | None = None) -> torch.Tensor:
    """Stable int64 codes for image ids: equal on every rank and every run (Python's hash() is salted).

    64-bit blake2b digests: a collision (two images treated as one) has probability ~n^2 / 2^64.
    """
    codes = [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
             for i in image_ids]
    return torch.tensor(codes, dtype=torch.long, device=device)


def _negative_weights(sim: torch.Tensor, same_id: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Row-stochastic `b n` weights: softmax over allowed columns, uniform where that is not finite.

    Allowed = not the same image id; a row with no such column (the whole global batch shows one image)
    falls back to every column but its positive. Softmax is taken with disallowed columns at -inf, so the
    allowed ones can never all underflow to zero; non-finite similarities fall back to uniform.
    """
    allowed = ~same_id
    allowed = torch.where(allowed.any(dim=1, keepdim=True), allowed, ~positive)  # `b n`
    weights = sim.float().masked_fill(~allowed, float("-inf")).softmax(dim=1)
    bad = ~torch.isfinite(weights).all(dim=1, keepdim=True) | ~(weights.sum(dim=1, keepdim=True) > 0)
    uniform = allowed.float() / allowed.sum(dim=1, keepdim=True)
    return torch.where(bad, uniform, weights.nan_to_num(0.0))


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_ids_local: torch.Tensor | None,
    image_ids_global: torch.Tensor | None,
    rank: int,
    generator: torch.Generator | None = None,
    text_codes_local: torch.Tensor | None = None,
    text_codes_global: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices of one hard negative text per local image and one hard negative image per local text.

    sim_i2t: `b (w b)` local images vs all texts; sim_t2i: `b (w b)` local texts vs all images (scaled
    similarities, i.e. ITC logits; detached here). image_ids_local `b` / image_ids_global `(w b)`: int
    codes (`image_id_codes`); None means every pair is a distinct image. text_codes_* (`text_codes`): pairs
    whose captions are identical are excluded too -- an identical caption is a positive in disguise (web data
    repeats captions; the synthetic set repeats them by design). The positive of local row i is column
    b*rank + i. Returns (neg_text_idx `b`, neg_image_idx `b`), int64 indices into the global batch.
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
        weights = torch.cat([_negative_weights(sim_i2t, same_id, positive),
                             _negative_weights(sim_t2i, same_id, positive)])  # `(2 b) (w b)`
        drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # `(2 b)`
    return drawn[:b], drawn[b:]


_TEXT_HASH_SEED = 20261122


def text_codes(input_ids: torch.Tensor) -> torch.Tensor:
    """`b l` token ids -> `b` int64 codes, equal for identical rows (a fixed random linear hash, on device,
    no host sync; ids < 2^20 and weights < 2^31 keep every partial sum below 2^63)."""
    gen = torch.Generator().manual_seed(_TEXT_HASH_SEED)
    weights = torch.randint(1, 2**31 - 1, (input_ids.shape[1],), generator=gen, dtype=torch.int64)
    return (input_ids.long() * weights.to(input_ids.device)[None, :]).sum(dim=1)


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
