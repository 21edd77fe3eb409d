"""Activation checkpointing of transformer blocks (`model.activation_checkpointing`).

A checkpointed block keeps only its input for backward and recomputes its activations there: about one
extra block forward per step for activation memory that no longer grows with the block's internals
(attention probabilities, the 4x-wide FFN hidden state). Every block stack (`Transformer`,
`MultiwayTransformer`) carries a `checkpoint_blocks` count and runs its first that many blocks through
`run_block`; `set_activation_checkpointing` sets the count on every stack of a model, so no architecture
has to know about it.

Results do not change: `torch.utils.checkpoint` with `use_reentrant=False` recomputes the same ops, and
`preserve_rng_state=True` replays the forward's dropout masks. Without autograd (eval, inference, the
momentum teacher under `no_grad`) and with a KV cache (incremental decoding) blocks run plainly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, checkpointed: bool, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`block(*args, **kwargs)`, through `torch.utils.checkpoint` when `checkpointed` and autograd records."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return block(*args, **kwargs)


def blocks_to_checkpoint(setting: bool | int, depth: int) -> int:
    """How many of a `depth`-block stack's first blocks `setting` checkpoints: true = all, false = none,
    an int n = min(n, depth) (a stack shallower than n checkpoints all of its blocks)."""
    if isinstance(setting, bool):
        return depth if setting else 0
    if setting < 0:
        raise ValueError(f"activation_checkpointing={setting} must be true, false or a number of blocks >= 0")
    return min(int(setting), depth)


def block_stacks(model: nn.Module) -> dict[str, nn.Module]:
    """Every block stack of `model` by qualified name: modules with `blocks` and a `checkpoint_blocks` count."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "checkpoint_blocks") and hasattr(m, "blocks")}


def set_activation_checkpointing(model: nn.Module, setting: bool | int) -> dict[str, int]:
    """Set `checkpoint_blocks` on every block stack of `model` (momentum-teacher copies too: they run without
    autograd, so it costs them nothing); returns stack name -> blocks checkpointed."""
    counts = {}
    for name, stack in block_stacks(model).items():
        stack.checkpoint_blocks = blocks_to_checkpoint(setting, len(stack.blocks))
        counts[name] = stack.checkpoint_blocks
    return counts
