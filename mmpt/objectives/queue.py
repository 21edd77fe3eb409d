"""A ring buffer of past (momentum) features: extra contrastive negatives beyond the current global batch.

The queue lives in buffers (`feats`, `ptr`) so it is part of the model's state dict and therefore of every
DeepSpeed checkpoint: a resumed run continues with the same negatives instead of a random queue. Every rank
enqueues the same all-gathered (rank-major) batch, so the queues stay identical on all ranks without a
broadcast. Buffers are never ZeRO-partitioned and DeepSpeed keeps fp32 buffers in fp32 under bf16/fp16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.distributed import all_gather_no_grad


def validate_queue_size(size: int, global_batch: int) -> None:
    """Raise ValueError unless `size` is a positive multiple of the global batch (micro batch x world).

    ALBEF writes whole global batches; a size that is not a multiple would make the oldest entries of one
    batch survive while the rest are overwritten, and ties the queue length to the batch in a surprising
    way. Call it at config-validation time so the error appears before any process group exists.
    """
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    if size <= 0 or size % global_batch:
        lower = (size // global_batch) * global_batch
        nearest = [n for n in (lower, lower + global_batch) if n > 0]
        raise ValueError(
            f"queue size {size} must be a positive multiple of the global batch {global_batch} "
            f"(per-rank batch x world size); nearest valid sizes: {', '.join(map(str, nearest))}"
        )


class FeatureQueue(nn.Module):
    """`size d` queue of L2-normalised features with a write pointer; oldest entries are overwritten first.

    Initialised with random unit vectors (as ALBEF does), so the queue is usable from step 0 and no
    valid-count masking is needed. Seed identically on every rank before construction (the trainer does).
    `initial` (`size d`, any dtype) replaces that start, e.g. int64 pair codes that match nothing
    (`objectives.pair_codes.unmatched_codes`) for a code queue written in step with a feature queue.
    """

    feats: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, dim: int, size: int, initial: torch.Tensor | None = None) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"FeatureQueue needs dim > 0 and size > 0, got dim={dim}, size={size}")
        if initial is not None and tuple(initial.shape) != (size, dim):
            raise ValueError(f"initial queue content must be ({size}, {dim}), got {tuple(initial.shape)}")
        self.register_buffer("feats", F.normalize(torch.randn(size, dim), dim=-1) if initial is None else initial)
        # Shape (1,), not 0-d: collective broadcasts of buffers reject 0-d tensors in some backends.
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.feats.shape[0]

    def extra_repr(self) -> str:
        return f"dim={self.feats.shape[1]}, size={self.size}"

    @torch.no_grad()
    def enqueue(self, local_feats: torch.Tensor) -> None:
        """Collective: gather `b d` from every rank (rank-major) and write the `(w b) d` batch at `ptr`."""
        self.enqueue_global(all_gather_no_grad(local_feats.detach()))

    @torch.no_grad()
    def enqueue_global(self, global_feats: torch.Tensor) -> None:
        """Write an already gathered `(w b) d` batch (identical on all ranks) at `ptr`, wrapping around.

        The pointer stays on the device and the write is an index_copy_, so there is no host sync.
        """
        n = global_feats.shape[0]
        validate_queue_size(self.size, n)
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size  # `(w b)`
        self.feats.index_copy_(0, idx, global_feats.detach().to(self.feats.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def forward(self) -> torch.Tensor:
        """The queue contents `size d` as a detached clone (safe to use after a later enqueue)."""
        return self.feats.detach().clone()
