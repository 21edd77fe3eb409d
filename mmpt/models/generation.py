"""Autoregressive decoding (greedy and beam search) for any captioner, independent of its architecture.

A model exposes its decoder as a `StepDecoder`: `step(tokens)` feeds the newest token of every row and
returns next-token logits; `reorder(index)` keeps the rows beam search selected. `CachedDecoder` does this
with KV caches (one token through the stack per step), `RecomputeDecoder` re-runs the whole prefix (slow,
the reference the cached path is tested against). The search loops here only ever see logits, so CoCa,
BLIP-style decoders and future captioners share them.

Conventions: every sequence starts with `bos_id` (not returned), the first `eos_id` ends it (returned),
everything after it is `pad_id`. `pad_id` and `bos_id` are never generated: pad is never a training target
(its logit is never trained) and bos only starts sequences.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from einops import rearrange

from mmpt.modules.kv_cache import TransformerCache


@dataclass(frozen=True)
class GenerationConfig:
    """max_len: most generated tokens (EOS included); min_len: EOS is forbidden before this many tokens."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_len: int = 20
    min_len: int = 0
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len={self.max_len} must be >= 1")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len={self.min_len} must be in [0, max_len={self.max_len}]")
        if len({self.bos_id, self.eos_id, self.pad_id}) != 3:
            raise ValueError(f"bos_id, eos_id, pad_id must differ, got {self.bos_id}, {self.eos_id}, {self.pad_id}")


class StepDecoder(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `n 1` (the newest id of each row) -> logits `n v` for the next token."""
        ...

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (`n`, into the current rows) for the next step."""
        ...


def reorder_self_attention_(cache: TransformerCache, index: torch.Tensor) -> None:
    """In place: select rows `index` of every self-attention cache.

    Cross-attention caches are left alone: beam search only moves hypotheses between beams of the same
    image, whose context rows are identical, and copying 256 image tokens x layers per step is expensive.
    """
    for layer in cache.layers:
        kv = layer.self_attn
        if kv.k is not None and kv.v is not None:
            kv.k, kv.v = kv.k.index_select(0, index), kv.v.index_select(0, index)


class CachedDecoder:
    """`step_fn(tokens `n 1`) -> logits `n v`` runs one token per row through stacks that keep `caches`."""

    def __init__(self, step_fn: Callable[[torch.Tensor], torch.Tensor], caches: Sequence[TransformerCache]) -> None:
        self.step_fn = step_fn
        self.caches = caches

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.step_fn(tokens)

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            reorder_self_attention_(cache, index)


class RecomputeDecoder:
    """`logits_fn(prefix `n t`) -> logits `n t v`` over the whole prefix each step (no cache; reference path).

    Per-image inputs captured by `logits_fn` (e.g. image context) need no reordering, see
    `reorder_self_attention_`.
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.logits_fn = logits_fn
        self.prefix: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prefix = tokens if self.prefix is None else torch.cat([self.prefix, tokens], dim=1)
        return self.logits_fn(self.prefix)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        if self.prefix is not None:
            self.prefix = self.prefix.index_select(0, index)


def _allowed_log_probs(logits: torch.Tensor, step: int, cfg: GenerationConfig) -> torch.Tensor:
    """`n v` logits -> fp32 log-probs renormalised over the tokens allowed at this step."""
    banned = [cfg.pad_id, cfg.bos_id] + ([cfg.eos_id] if step < cfg.min_len else [])
    logits = logits.float().index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
    return logits.log_softmax(dim=-1)


def _trim(seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Drop trailing columns that are padding in every row (`b t` -> `b t'`, t' = longest sequence)."""
    return seqs[:, : int(lengths.max().item())] if seqs.shape[1] else seqs


@torch.no_grad()
def greedy_search(decoder: StepDecoder, batch_size: int, cfg: GenerationConfig, device: torch.device) -> torch.Tensor:
    """Argmax decoding of `batch_size` rows -> ids `b t` (t <= max_len; EOS kept, pad after it)."""
    tokens = torch.full((batch_size, 1), cfg.bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
    out: list[torch.Tensor] = []
    for step in range(cfg.max_len):
        next_ids = _allowed_log_probs(decoder.step(tokens), step, cfg).argmax(dim=-1)
        next_ids = next_ids.masked_fill(finished, cfg.pad_id)
        lengths += (~finished).long()
        finished = finished | (next_ids == cfg.eos_id)
        out.append(next_ids)
        if bool(finished.all()):  # one host sync per step: fine outside the training hot path
            break
        tokens = rearrange(next_ids, "n -> n 1")
    return _trim(torch.stack(out, dim=1), lengths)


@torch.no_grad()
def beam_search(
    decoder: StepDecoder, batch_size: int, num_beams: int, cfg: GenerationConfig, device: torch.device
) -> torch.Tensor:
    """Beam search over `batch_size * num_beams` rows (row = image * num_beams + beam) -> best ids `b t`.

    Hypotheses are ranked by length-normalised log-probability (sum log p / len ** length_penalty) at
    every step, so finished beams (which continue with pad at log p = 0 and keep their score) compete
    fairly with longer live ones. At the first step only beam 0 is live (all beams are the same BOS).
    With num_beams=1 this reduces to greedy search.
    """
    b, k = batch_size, num_beams
    tokens = torch.full((b * k, 1), cfg.bos_id, dtype=torch.long, device=device)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # summed log-probs
    lengths = torch.zeros(b, k, device=device)
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    seqs = torch.empty(b, k, 0, dtype=torch.long, device=device)
    offsets = rearrange(torch.arange(b, device=device) * k, "b -> b 1")
    for step in range(cfg.max_len):
        log_probs = rearrange(_allowed_log_probs(decoder.step(tokens), step, cfg), "(b k) v -> b k v", k=k)
        vocab = log_probs.shape[-1]
        pad_only = torch.full((vocab,), float("-inf"), device=device)
        pad_only[cfg.pad_id] = 0.0  # a finished beam continues with pad at no cost
        log_probs = torch.where(rearrange(finished, "b k -> b k 1"), pad_only, log_probs)
        cand_len = lengths + (~finished).float()  # `b k`, >= 1 for every beam that can be chosen
        cand = rearrange(scores, "b k -> b k 1") + log_probs  # `b k v`
        ranked = cand / rearrange(cand_len.clamp(min=1.0) ** cfg.length_penalty, "b k -> b k 1")
        _, flat = rearrange(ranked, "b k v -> b (k v)").topk(k, dim=-1)  # `b k`
        beam, next_ids = flat // vocab, flat % vocab
        scores = rearrange(cand, "b k v -> b (k v)").gather(1, flat)
        lengths = cand_len.gather(1, beam)
        finished = finished.gather(1, beam) | (next_ids == cfg.eos_id)
        history = seqs.gather(1, rearrange(beam, "b k -> b k 1").expand(-1, -1, seqs.shape[-1]))
        seqs = torch.cat([history, rearrange(next_ids, "b k -> b k 1")], dim=-1)
        if bool(finished.all()) or step == cfg.max_len - 1:
            break
        decoder.reorder(rearrange(beam + offsets, "b k -> (b k)"))
        tokens = rearrange(next_ids, "b k -> (b k) 1")
    best = (scores / lengths.clamp(min=1.0) ** cfg.length_penalty).argmax(dim=-1)  # `b`
    rows = torch.arange(b, device=device)
    return _trim(seqs[rows, best], lengths[rows, best].long())
