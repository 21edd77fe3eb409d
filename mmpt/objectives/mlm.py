"""Masked language modelling: BERT-style token masking and the (optionally distilled) MLM loss.

Masking is a few elementwise random draws on the device (no host sync, no loop over the batch), so it
can run in the model or in a collate function. The loss is averaged over masked positions of the whole
micro-batch; with momentum distillation it mixes the hard label with the teacher's soft prediction.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def _random_regular_tokens(
    shape: torch.Size, vocab_size: int, excluded: Sequence[int], device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform draws from [0, vocab) minus `excluded`: draw in the smaller range, then skip over excluded ids.

    Walking the sorted excluded ids and adding 1 past each maps rank r to the r-th allowed id exactly, so
    no rejection loop or vocab-sized table is needed (the loop is over the few special ids, not the batch).
    """
    excluded = sorted({i for i in excluded if 0 <= i < vocab_size})
    if len(excluded) >= vocab_size:
        raise ValueError("every token id is special: no random replacement token exists")
    tokens = torch.randint(vocab_size - len(excluded), shape, device=device, generator=generator)
    for special in excluded:
        tokens += (tokens >= special).long()
    return tokens


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of `b l` token ids -> (masked_ids `b l`, labels `b l`).

    Each real (attention_mask = 1), non-special token is selected with probability `prob`; a selected token
    becomes [MASK] with p 0.8, a random regular token (never a special id or [MASK]) with p 0.1, and stays
    unchanged with p 0.1. labels hold the original id at selected positions and -100 elsewhere, so
    [CLS]/[SEP]/[PAD] and padding are never predicted. `generator` must live on input_ids' device.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mask probability must be in [0, 1], got {prob}")
    device = input_ids.device
    protected = sorted({int(i) for i in special_ids} | {mask_id})  # host ints: no device round trip
    special = torch.tensor(protected, dtype=input_ids.dtype, device=device)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, special)  # `b l`
    selected = candidate & (torch.rand(input_ids.shape, device=device, generator=generator) < prob)
    action = torch.rand(input_ids.shape, device=device, generator=generator)  # 80 / 10 / 10 split
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = _random_regular_tokens(input_ids.shape, vocab_size, protected, device, generator)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def masked_rows_capacity(num_positions: int, prob: float) -> int:
    """How many rows `masked_rows` returns for `num_positions` positions masked at `prob`: the mean count
    plus 6 standard deviations plus 8, at most all positions."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mask probability must be in [0, 1], got {prob}")
    n = num_positions
    return min(n, math.ceil(prob * n + 6.0 * math.sqrt(n * prob * (1.0 - prob))) + 8)


def masked_rows(labels: torch.Tensor, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices `k` of the masked (label != -100) positions of `labels` `...`, and their labels `k`.

    Why: the vocabulary projection, its softmax and argmax are a large share of a small model's step when
    run at every position, yet only the ~prob masked ones enter the loss. k is fixed by the shape
    (torch.nonzero_static: no host sync on GPU): the mean count prob*n plus 6 standard deviations plus 8,
    at most n. Unused slots point at row 0 with label -100 (ignored). More masked positions than k (odds
    below 1e-9 for `mask_tokens` at `prob`) would leave the excess out of the loss, never crash.
    Use as `head(hidden.flatten(0, -2)[index])` with `hidden` `... d`.
    """
    flat = labels.reshape(-1)
    capacity = masked_rows_capacity(flat.numel(), prob)
    index = torch.nonzero_static(flat != IGNORE_INDEX, size=capacity, fill_value=-1).squeeze(1)  # `k`
    used = index >= 0
    index = index.clamp(min=0)
    return index, torch.where(used, flat[index], torch.full_like(index, IGNORE_INDEX))


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * CE(labels) + alpha * soft-CE(softmax(teacher_logits)), averaged over masked positions.

    logits / teacher_logits: `... v`; labels: `...` with -100 at unmasked positions. Any leading shape works,
    so a caller may pass all positions (no host sync) or only the gathered masked ones. A micro-batch with
    no masked token gives loss 0 (with a graph), not NaN. Returns (loss, metrics), metrics detached.
    """
    v = logits.shape[-1]
    dtype = torch.promote_types(logits.dtype, torch.float32)  # log-softmax over the vocab in >= fp32
    flat = logits.reshape(-1, v).to(dtype)  # `n v`
    target = labels.reshape(-1)  # `n`
    masked = target != IGNORE_INDEX
    count = masked.sum().clamp(min=1)
    loss = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum") / count
    if teacher_logits is not None:
        soft = teacher_logits.detach().reshape(-1, v).to(dtype).softmax(dim=-1)
        soft_ce = -(soft * F.log_softmax(flat, dim=-1)).sum(dim=-1)  # `n`
        soft_loss = torch.where(masked, soft_ce, 0.0).sum() / count
        loss = (1 - alpha) * loss + alpha * soft_loss
    with torch.no_grad():
        correct = (flat.argmax(dim=-1) == target) & masked
        metrics = {"mlm_acc": correct.sum() / count}
    return loss, metrics
