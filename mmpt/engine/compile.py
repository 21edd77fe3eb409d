"""`trainer.compile=true`: `torch.compile` of every transformer block, in place, before DeepSpeed sees the model.

Why per block and not the whole model:
- The blocks hold nearly all of a step's FLOPs; what lies between them (objectives, collectives such as ITC's
  gather-with-grad, ITM's `multinomial` negatives, MLM masking, feature queues, `Batch` handling) is
  data-dependent Python that would break a whole-model graph into many pieces and recompile it per objective
  set and batch kind.
- Identical blocks share one compiled graph (parameters are graph inputs), so compile time grows with the
  number of distinct block layouts (ViT, text, fusion, train / eval), not with depth.
- Activation checkpointing (mmpt/modules/checkpointing.py) wraps each block call from the outside in eager
  code, so recomputation replays the compiled block; DeepSpeed ZeRO 0-2 hooks sit on the parameters'
  gradients, outside the graphs.

`nn.Module.compile()` compiles a module's call in place: no wrapper module, so parameters are the same
objects (the optimizer, DeepSpeed's flat buffers and the momentum teacher's EMA all see the tensors the graphs
read) and state-dict keys stay unchanged (no `_orig_mod.` in checkpoints or exports). The momentum teacher's
copies are blocks too and are compiled the same way (their no-grad calls are their own graphs).
"""
from __future__ import annotations

from torch import nn

from mmpt.modules.block import Block
from mmpt.modules.multiway import MultiwayBlock

COMPILED_BLOCKS: tuple[type[nn.Module], ...] = (Block, MultiwayBlock)

# One block class serves many layouts in one run (ViT, masked text, cross-attending fusion, a momentum teacher
# without autograd, eval mode, a second batch size for ITM negatives): each is its own compiled graph of the
# same `forward`. Dynamo's default of 8 per function would silently send later layouts back to eager.
RECOMPILE_LIMIT = 64


def compile_backends() -> list[str]:
    """The backend names `trainer.compile_backend` accepts (torch's registered ones)."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """In place: `torch.compile` every `Block` / `MultiwayBlock` of `model` (teacher copies included);
    returns how many. Compilation happens lazily at each layout's first call."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [m for m in model.modules() if isinstance(m, COMPILED_BLOCKS)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
