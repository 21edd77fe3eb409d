"""Process-group helpers shared by objectives, engine and eval (no-ops in a single process)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns each rank its slice of the summed upstream gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.local_size = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's features
        start = dist.get_rank() * ctx.local_size
        return grad[start : start + ctx.local_size]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`b d` on each rank -> `(w b) d`, rank-major; gradients flow back to the owning rank."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """`b ...` -> `(w b) ...` without autograd (teacher features, queues, eval)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _broadcastable(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`r` -> `r 1 ... 1` with like.ndim dims."""
    return mask.reshape(mask.shape[0], *([1] * (like.ndim - 1)))


def gather_rows(local: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of the rank-major global batch `(w b) ...` whose rank-`r` block is `local` `b ...`.

    Rows owned by this rank are taken from `local` itself and keep its gradient; rows of other ranks come
    from a no-grad all-gather and are constants here. Collective whenever world_size > 1: every rank calls
    it with the same `local` shape. Returns `k ...` for `index` `k` (int64 global indices).
    """
    if world_size() == 1:
        return local[index]
    b = local.shape[0]
    start = rank() * b
    gathered = all_gather_no_grad(local.detach())  # `(w b) ...`, transient
    own = (index >= start) & (index < start + b)  # `k`
    from_local = local[(index - start).clamp(0, b - 1)]  # `k ...`, garbage (masked below) where not own
    return torch.where(_broadcastable(own, from_local), from_local, gathered[index])


def all_gather_objects(obj: object) -> list[object]:
    """Gather any picklable object from all ranks (variable-size eval shards, strings)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()
