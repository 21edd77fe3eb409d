"""k-means in torch: k-means++ seeding, then full-batch Lloyd iterations with empty-cluster re-seeding.

All distance work is one matrix product per chunk of points (`n k`), never a Python loop over points;
chunks bound the `n k` distance matrix so a large fit fits in memory. The loops that remain are over
centres (k-means++ picks one centre after another by construction) and over iterations.
Deterministic for a seed on a given device (CPU: bitwise).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (stage "init" | "lloyd", step done, total steps, inertia after the step or None)
Progress = Callable[[str, int, int, "float | None"], None]

DISTANCE_BUDGET = 1 << 24  # entries of one chunk's `n k` distance matrix (64 MiB in fp32)


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """`n d`, `k d` -> `n k` squared Euclidean distances, via |x|^2 - 2 x.c + |c|^2 (one matmul)."""
    d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ centres.T) + (centres * centres).sum(-1)
    return d2.clamp_(min=0.0)


def assign(x: torch.Tensor, centres: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of each point: (ids `n` int64, squared distance `n`), `chunk` points at a time."""
    chunk = chunk or max(1, DISTANCE_BUDGET // max(1, centres.shape[0]))
    ids, dists = [], []
    for start in range(0, x.shape[0], chunk):
        d2 = squared_distances(x[start : start + chunk], centres)
        best, idx = d2.min(dim=-1)
        ids.append(idx)
        dists.append(best)
    return torch.cat(ids), torch.cat(dists)


def kmeans_plus_plus(
    x: torch.Tensor, k: int, generator: torch.Generator, progress: Progress | None = None
) -> torch.Tensor:
    """k centres `k d` chosen among the points: the first uniformly, each next one with probability
    proportional to its squared distance to the nearest centre chosen so far (Arthur & Vassilvitskii 2007).
    If all remaining mass is zero (fewer distinct points than k) the draw falls back to uniform."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centres = [x[first]]
    nearest = squared_distances(x, centres[0]).squeeze(1)  # `n`
    for _ in range(1, k):
        weights = torch.where(nearest.sum() > 0, nearest, torch.ones_like(nearest))
        pick = torch.multinomial(weights, 1, generator=generator)
        centres.append(x[pick])
        nearest = torch.minimum(nearest, squared_distances(x, centres[-1]).squeeze(1))
        if progress is not None and len(centres) % max(1, k // 100) == 0:
            progress("init", len(centres), k, None)
    return torch.cat(centres)


def lloyd_step(
    x: torch.Tensor, centres: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One Lloyd iteration -> (new centres `k d`, assignment `n` to the old centres, inertia, re-seeded).

    A centre that no point chose is moved onto the points worst served by their current centre (largest
    distance, one distinct point per empty centre), the usual repair that keeps all k codes in use.
    """
    k = centres.shape[0]
    ids, d2 = assign(x, centres, chunk)
    counts = torch.bincount(ids, minlength=k)
    sums = torch.zeros_like(centres).index_add_(0, ids, x)
    new = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
    empty = torch.nonzero(counts == 0).squeeze(1)  # fitting is offline: this host sync is fine
    if empty.numel():
        far = d2.topk(int(empty.numel())).indices
        new[empty] = x[far]
    return new, ids, float(d2.sum()), int(empty.numel())


@dataclass
class KMeansResult:
    centres: torch.Tensor  # `k d`
    inertia: list[float]  # sum of squared distances to the assigned centre, per Lloyd iteration
    reseeded: int  # empty clusters re-seeded over the whole fit
    iterations: int


def fit_kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    init_points: int | None = None,
    init: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> KMeansResult:
    """k-means of points `n d` -> centres `k d` (float32).

    Seeding runs k-means++ on `init_points` points drawn at random (default min(n, 16 k)): its k sequential
    passes cost O(k * points * d), so seeding on all of a large n would dominate the fit. `init` (`k d`)
    replaces the seeding. Stops early when an iteration leaves every assignment unchanged.
    """
    if x.ndim != 2:
        raise ValueError(f"k-means expects points `n d`, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(
            f"k-means needs 1 <= k <= number of points, got k={k} with {n} points; use fewer codes or more images"
        )
    if iters < 1:
        raise ValueError(f"k-means needs iters >= 1, got {iters}")
    x = x.float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if init is None:
        m = min(n, init_points or 16 * k)
        sample = x if m == n else x[torch.randperm(n, generator=generator, device=x.device)[:m]]
        centres = kmeans_plus_plus(sample, k, generator, progress)
    else:
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init centres must be `k d` = {(k, x.shape[1])}, got {tuple(init.shape)}")
        centres = init.to(x).clone()
    inertia: list[float] = []
    reseeded, previous, done = 0, None, 0
    for done in range(1, iters + 1):
        centres, ids, loss, empty = lloyd_step(x, centres)
        inertia.append(loss)
        reseeded += empty
        if progress is not None:
            progress("lloyd", done, iters, loss)
        if previous is not None and empty == 0 and torch.equal(ids, previous):
            break
        previous = ids
    return KMeansResult(centres=centres, inertia=inertia, reseeded=reseeded, iterations=done)
