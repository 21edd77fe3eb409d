"""Memory autograd holds for the backward of the SigLIP loss at a large global batch, simulated on one process.

A global batch B = world x b (default 16 x 1,024 = 16,384) is split into `world` chunks; the chunked loss
(mmpt/objectives/siglip.py) runs as rank 0 of that world through `SimulatedRing`, which hands it the other
ranks' text chunks as a real ring would (what rank 0 would send is dropped; gradient accumulators arriving
from other ranks are zeros — they do not change what rank 0 keeps). Three losses, same features:

  chunked    mmpt's SigLIP, rank 0: blocks `b b` recomputed in backward, only features saved
  per-rank   rank 0's rows against all B texts with plain autograd: `b B` logits kept (what a chunked loss
             whose blocks stay in the graph keeps per rank, e.g. open_clip's, PR #1214)
  dense      the plain single-process loss: `B B` logits kept

Measured: the bytes of every tensor autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
each tensor counted once by storage. `dense` runs on the meta device (it would need several GiB); the script
checks that meta and real tensors give the same count on the `per-rank` graph. On CUDA (--device cuda) it
also prints torch.cuda.max_memory_allocated of each forward + backward (real peaks, transients included).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/bench/bench_siglip_memory.py [--world 16 --local 1024 --embed 256]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmpt.objectives.siglip import sigmoid_loss


class SimulatedRing:
    """Rank `rank` of `len(chunks)` ranks in one process (see the module docstring)."""

    def __init__(self, chunks: list[torch.Tensor], rank: int = 0) -> None:
        self.chunks, self.rank, self.world = chunks, rank, len(chunks)
        self._owner = {c.data_ptr(): i for i, c in enumerate(chunks)}

    def shift(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        owner = self._owner.get(tensors[0].data_ptr())
        if owner is None:  # the last hop of a gradient accumulator
            return [torch.zeros_like(t) for t in tensors]
        return [self.chunks[(owner - 1) % self.world]] + [torch.zeros_like(t) for t in tensors[1:]]


def saved_bytes(step: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves while `step` builds its graph (distinct storages), and the loss."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.device.type, t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t.dtype, t.shape)
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    return sum(seen.values()), loss


def plain_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, first_positive: int
               ) -> torch.Tensor:
    """Rows `img` `n e` against all `txt` `N e`; the positive of row i is column first_positive + i."""
    n, total = img.shape[0], txt.shape[0]
    z = -torch.ones(n, total, dtype=img.dtype, device=img.device)
    z[torch.arange(n), first_positive + torch.arange(n)] = 1.0
    return -F.logsigmoid(z * (scale * img @ txt.T + bias)).sum() / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=16)
    ap.add_argument("--local", type=int, default=1024)
    ap.add_argument("--embed", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    w, b, e, dev = args.world, args.local, args.embed, torch.device(args.device)
    B = w * b
    torch.manual_seed(0)
    txt_all = F.normalize(torch.randn(B, e, device=dev), dim=-1)
    img0 = F.normalize(torch.randn(b, e, device=dev), dim=-1).requires_grad_()
    t_prime = torch.tensor(2.3, device=dev, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    chunks = list(txt_all.split(b))
    chunks[0].requires_grad_()  # rank 0's own text features: a leaf of its graph

    def chunked() -> torch.Tensor:
        return sigmoid_loss(img0, chunks[0], t_prime.exp(), bias, ring=SimulatedRing(chunks))[0]

    def per_rank(device: torch.device = dev) -> torch.Tensor:
        img, txt = img0.detach().to(device).requires_grad_(), txt_all.to(device).requires_grad_()
        return plain_loss(img, txt, t_prime.to(device).exp(), bias.to(device), first_positive=0)

    def dense() -> torch.Tensor:
        meta = torch.device("meta")
        img, txt = torch.empty(B, e, device=meta, requires_grad=True), torch.empty(B, e, device=meta, requires_grad=True)
        return plain_loss(img, txt, torch.empty((), device=meta, requires_grad=True).exp(),
                          torch.empty((), device=meta, requires_grad=True), first_positive=0)

    results = {}
    for name, step in (("chunked", chunked), ("per-rank", per_rank), ("dense", dense)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        nbytes, loss = saved_bytes(step)
        if loss.device.type != "meta":
            loss.backward()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" and name != "dense" else None
        results[name] = nbytes
        extra = f" | CUDA peak over inputs {peak / 2**20:9.1f} MiB" if peak is not None else ""
        timing = f" | fwd+bwd {seconds:6.2f} s" if name != "dense" else " | (meta device: not run)"
        print(f"{name:9s} saved for backward {nbytes / 2**20:10.2f} MiB{timing}{extra}", flush=True)
    meta_count, _ = saved_bytes(lambda: per_rank(torch.device("meta")))
    assert meta_count == results["per-rank"], (meta_count, results["per-rank"])
    print(f"global batch {B} = {w} simulated ranks x {b}, embed {e}, fp32, {dev.type}")
    print(f"chunked / dense    = {results['chunked'] / results['dense']:.2e} (goal <= 1/16 = {1 / 16:.4f})")
    print(f"chunked / per-rank = {results['chunked'] / results['per-rank']:.2e}")
    print(f"per-rank / dense   = {results['per-rank'] / results['dense']:.4f}")


if __name__ == "__main__":
    main()
