"""What GradCache costs and saves: one contrastive batch of N x b pairs in one graph vs GradCache (N micro-batches
of b), one process, plain PyTorch (no DeepSpeed), fp32.

    python scripts/bench/bench_grad_cache.py [--preset tiny] [--batch 16] [--steps 4] [--rounds 0]

Memory: 
Counts the bytes of the distinct tensor storages autograd saves for backward (`saved_tensors_hooks`), parameters
excluded (they are held anyway), i.e. the activation memory, independent of allocator and machine load. Full batch: one forward of N x b pairs + the
ITC loss. GradCache (`mmpt.engine.grad_cache.cached_step`, what `trainer.contrastive_accum_steps=N` runs): the
largest graph alive at once, counted as the loss graph over the cached embeddings PLUS the first micro-batch's
re-forward (an upper bound: the loss graph is freed before that re-forward starts), then each further
re-forward alone. Also checks that both give the same gradients, and prints the ratio.

Time (--rounds R > 0): forward + backward of the whole contrastive batch, alternating the two ways R times on
the same model and inputs; prints the median seconds of each and samples/s of GradCache / one graph (GradCache
runs one extra forward without graph per micro-batch: ~0.75 expected where matmuls dominate).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmpt.data.batch import Batch
from mmpt.engine.grad_cache import cached_step
from mmpt.models.registry import build_model, preset_config


class SavedBytes:
    """Distinct non-parameter storages saved for backward since the last `take()` (a storage saved twice counts
    once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.params: set[int] = set()

    def ignore(self, model: torch.nn.Module) -> None:
        self.params |= {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def take(self) -> int:
        total, self.storages = sum(self.storages.values()), {}
        return total


def pairs(n: int, image_size: int, vocab: int, length: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    return Batch(images=torch.randn(n, 3, image_size, image_size, generator=g), input_ids=ids,
                 attention_mask=torch.ones_like(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="clip preset (tiny: 64 px, base: ViT-B/16 at 224 px)")
    ap.add_argument("--batch", type=int, default=16, help="b: pairs per micro-batch")
    ap.add_argument("--steps", type=int, default=4, help="N: micro-batches per contrastive batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds per side (0 = memory only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset_config("clip", args.preset)
    size, vocab, length = cfg.vision.image_size, cfg.text.vocab_size, cfg.text.max_text_len
    micro = [pairs(args.batch, size, vocab, length, seed=k) for k in range(args.steps)]
    full_batch = Batch(images=torch.cat([b.images for b in micro]), input_ids=torch.cat([b.input_ids for b in micro]),
                       attention_mask=torch.cat([b.attention_mask for b in micro]))

    torch.manual_seed(0)
    full = build_model(cfg)
    saved = SavedBytes()
    saved.ignore(full)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = full(full_batch).losses["itc"]
    full_bytes = saved.take()
    loss.backward()

    torch.manual_seed(0)
    cached = build_model(cfg)
    saved.ignore(cached)
    peaks: list[int] = []

    def backward(surrogate: torch.Tensor) -> None:
        peaks.append(saved.take())  # this micro-batch's graph (+ the loss graph, for the first)
        surrogate.backward()

    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        cached_step(cached, micro, {"itc": 1.0}, cached.contrastive_features, backward)
    worst = max(abs(p.grad - q.grad).max().item() for p, q in zip(full.parameters(), cached.parameters())
                if p.grad is not None)
    mib = 2**20
    n, b = args.steps, args.batch
    print(f"clip/{args.preset} ({size} px), contrastive batch {n * b} pairs, one process, fp32")
    print(f"  one graph of {n * b} pairs:          {full_bytes / mib:9.2f} MiB saved for backward (activations)")
    print(f"  GradCache {n} x {b}, largest graph: {max(peaks) / mib:9.2f} MiB "
          f"(per micro-batch: {', '.join(f'{p / mib:.2f}' for p in peaks)})")
    print(f"  ratio {full_bytes / max(peaks):.2f}x less; max |grad difference| {worst:.2e}")
    if args.rounds > 0:
        time_both(full, full_batch, micro, args.rounds)


def time_both(model: torch.nn.Module, full_batch: Batch, micro: list[Batch], rounds: int) -> None:
    """Alternating rounds on one model (gradients zeroed between): one graph vs GradCache over the same pairs."""
    def one_graph() -> None:
        model(full_batch).losses["itc"].backward()

    def grad_cache() -> None:
        cached_step(model, micro, {"itc": 1.0}, model.contrastive_features, torch.Tensor.backward)

    seconds: dict[str, list[float]] = {"one graph": [], "GradCache": []}
    for _ in range(rounds):
        for name, run in (("one graph", one_graph), ("GradCache", grad_cache)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"  step time, median of {rounds}: one graph {median['one graph']:.3f} s, GradCache {median['GradCache']:.3f} s; "
          f"GradCache samples/s = {median['one graph'] / median['GradCache']:.2f}x one graph's")


if __name__ == "__main__":
    main()
