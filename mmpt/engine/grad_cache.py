"""Contrastive gradient caching (GradCache, Gao et al. 2021): one contrastive loss over N micro-batches per rank
(`trainer.contrastive_accum_steps`), at the activation memory of one micro-batch.

A contrastive loss couples every pair of the batch, so plain gradient accumulation over N micro-batches
computes N small losses (negatives from one micro-batch x world), not one loss over N x b x world pairs.
GradCache gets the big loss exactly, because the loss depends on the parameters only through the per-pair
embeddings (and its own few parameters, e.g. the temperature):

1. embed all N micro-batches WITHOUT graph (`torch.no_grad`), keeping the `(N b) e` image/text embeddings
   and the RNG state before each micro-batch (dropout, patch dropout, masks);
2. the model's `contrastive_loss` over the concatenated embeddings (it all-gathers across ranks as usual):
   the gradient w.r.t. every embedding row and w.r.t. the loss's own parameters;
3. per micro-batch: restore its RNG state, forward again WITH graph through the engine and back-propagate the
   surrogate `sum(embedding * cached_grad)`, whose parameter gradient is exactly the loss's gradient through
   those rows; the loss parameters' cached gradients ride on the last backward as `sum(p * grad_p)`.
   Summed over micro-batches the parameter gradients equal those of one backward of the full-batch loss.

DeepSpeed sees N micro-batches per accumulation step (`gradient_accumulation_steps` = grad_accum x N in
mmpt/engine/ds_config.py) and divides every backward by that; the surrogate is multiplied by N, so each
GradCache group contributes its full-batch gradient / grad_accum, and engine.step() updates once, at the
boundary. Cost: one extra forward without graph per micro-batch (~+1/3 compute); memory: one micro-batch's
activations + the `(N b) e` embeddings and inputs of the group. Only with the `grad_cache` capability
(contrastive-only objectives, no momentum teacher, ZeRO 0-2: checked before launch).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmpt.data.batch import Batch, MixedBatch
from mmpt.models.protocol import ModelOutput

Features = tuple[torch.Tensor, torch.Tensor]  # (image `b e`, text `b e`), L2-normalised


@dataclass
class RngState:
    """The generators a forward may draw from: the CPU one and, on GPU, the batch's device's."""

    cpu: torch.Tensor
    device: torch.Tensor | None
    device_index: int | None

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state(), None, None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.device, self.device_index)


def pairs_of(batch: Batch | MixedBatch) -> Batch:
    """The pairs micro-batch (a `data.sources` run delivers it as the only part of a MixedBatch)."""
    if isinstance(batch, MixedBatch):
        if set(batch.parts) != {"pairs"}:
            raise ValueError(f"contrastive gradient caching trains on pairs only, got parts {sorted(batch.parts)}")
        batch = batch.parts["pairs"]
    if batch.kind != "pairs":
        raise ValueError(f"contrastive gradient caching trains on image-text pairs, got a {batch.kind} batch")
    return batch


def loss_rows(batches: Sequence[Batch]) -> Batch:
    """The group's rows for `contrastive_loss` (ids, masks, image ids, keys, captions; no pixels), in order.
    Captions are padded to one length with the mask's zeros, so the caption codes ignore it."""
    length = max(int(b.input_ids.shape[1]) for b in batches)  # type: ignore[union-attr]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(t, (0, length - t.shape[1]))

    return Batch(
        input_ids=torch.cat([pad(b.input_ids) for b in batches]),  # type: ignore[arg-type]
        attention_mask=torch.cat([pad(b.attention_mask) for b in batches]),  # type: ignore[arg-type]
        keys=[k for b in batches for k in b.keys],
        image_ids=[i for b in batches for i in b.image_ids] if all(len(b.image_ids) == len(b) for b in batches) else [],
        captions=[c for b in batches for c in b.captions],
    )


def cached_step(
    model: Any,
    batches: Sequence[Batch],
    weights: dict[str, float],
    forward_with_graph: Callable[[Batch], Features],
    backward: Callable[[torch.Tensor], Any],
    scale: float = 1.0,
) -> tuple[ModelOutput, torch.Tensor]:
    """Steps 1-3 of the module docstring for one group of micro-batches -> (the group's ModelOutput, its
    weighted total loss, detached). `backward(surrogate)` runs once per micro-batch; parameter gradients summed
    over them equal `scale` x the gradient of the group's loss (plain PyTorch: scale 1, `Tensor.backward`)."""
    device = batches[0].input_ids.device  # type: ignore[union-attr]
    states: list[RngState] = []
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in batches:
            states.append(RngState.capture(device))
            image, text = model.contrastive_features(batch)
            images.append(image)
            texts.append(text)
    sizes = [len(x) for x in images]
    image_all = torch.cat(images).requires_grad_()  # `(N b) e` leaves
    text_all = torch.cat(texts).requires_grad_()
    out: ModelOutput = model.contrastive_loss(image_all, text_all, loss_rows(batches))
    total = sum(weights[name] * loss for name, loss in out.losses.items())
    params = [p for p in model.parameters() if p.requires_grad]  # only the loss's own get a gradient here
    grads = torch.autograd.grad(total, [image_all, text_all, *params], allow_unused=True)
    image_grads, text_grads = grads[0].split(sizes), grads[1].split(sizes)
    loss_params = [(p, g) for p, g in zip(params, grads[2:]) if g is not None]
    last = len(batches) - 1
    for k, batch in enumerate(batches):
        states[k].restore()  # the same dropout / masks as in the embedding pass
        image, text = forward_with_graph(batch)
        surrogate = (image * image_grads[k]).sum() + (text * text_grads[k]).sum()
        if k == last:  # on the boundary backward, where ZeRO reduces every gradient it has seen
            surrogate = surrogate + sum((p * g).sum() for p, g in loss_params)
        backward(surrogate * scale)
    return ModelOutput({k: v.detach() for k, v in out.losses.items()}, out.metrics), total.detach()


@dataclass
class _Routed:
    """A plain container, as `ModelOutput` is: DeepSpeed registers no output hooks on it, so the backward
    takes the same engine path as every ordinary mmpt micro-step."""

    features: Features


@contextmanager
def forward_as_features(model: nn.Module) -> Iterator[None]:
    """Make `model(batch)` return `_Routed(model.contrastive_features(batch))` for a while: the re-forward must
    pass through DeepSpeed's engine forward (its per-micro-batch ZeRO bookkeeping, hooks and autocast), which
    only ever calls `module(...)`. An instance attribute shadows the class's forward, restored on exit."""
    model.forward = lambda batch: _Routed(model.contrastive_features(batch))  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward


def engine_step(engine: Any, batches: Sequence[Batch | MixedBatch], weights: dict[str, float]
                ) -> tuple[ModelOutput, torch.Tensor]:
    """One GradCache group through a DeepSpeed engine whose gradient_accumulation_steps counts these
    micro-batches: N engine.backward + engine.step calls, the last of which is the boundary of this group
    (or of the last of trainer.grad_accum groups)."""
    model = engine.module
    pairs = [pairs_of(b) for b in batches]

    def forward_with_graph(batch: Batch) -> Features:
        with forward_as_features(model):
            return engine(batch).features

    def backward(surrogate: torch.Tensor) -> None:
        engine.backward(surrogate)
        engine.step()

    return cached_step(model, pairs, weights, forward_with_graph, backward, scale=float(len(pairs)))


class GradCacheAccumulator:
    """Trainer side: collects micro-batches and runs `engine_step` on every `steps`-th."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.pending: list[Batch | MixedBatch] = []

    def add(self, engine: Any, batch: Batch | MixedBatch, weights: dict[str, float]
            ) -> tuple[ModelOutput, torch.Tensor] | None:
        """None until the group is complete; then its (ModelOutput, total loss) after N backward passes."""
        self.pending.append(batch)
        if len(self.pending) < self.steps:
            return None
        group, self.pending = self.pending, []
        return engine_step(engine, group, weights)
