"""bf16 attention on CPU: torch's bf16 kernel vs the same attention computed in fp32, forward + backward.

    python scripts/bench/bench_cpu_attention.py [--threads 1] [--rounds 7] [--steps 4]

Why mmpt's `attend` runs low-precision attention in fp32 on CPU up to `CPU_FP32_ATTENTION_MAX_KEYS` keys:
for each shape `b h n d` (full, causal and key-padded), rounds alternate the two sides (`--steps` fwd + bwd
each) and the medians of milliseconds per step are printed with the ratio bf16 / fp32 (> 1: the fp32 path is
faster). The shapes cover the tiny presets (32-97 tokens), ViT-B/16 at 224 px (197) and longer sequences.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmpt.modules.attention import CPU_FP32_ATTENTION_MAX_KEYS, make_attn_mask

SHAPES = [(64, 1, 17, 64), (32, 2, 32, 64), (32, 2, 65, 64), (16, 2, 97, 64), (16, 2, 128, 64), (16, 4, 128, 32),
          (16, 2, 197, 64), (16, 4, 197, 32), (16, 2, 257, 64), (8, 2, 325, 64), (8, 2, 401, 64)]


def step_fn(b: int, h: int, n: int, d: int, kind: str, fp32: bool):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    mask = None
    if kind == "padded":
        keep = torch.ones(b, n, dtype=torch.long)
        keep[: b // 2, n // 2:] = 0
        mask = make_attn_mask(n, n, keep)

    def step() -> None:
        args = (q.float(), k.float(), v.float()) if fp32 else (q, k, v)
        out = F.scaled_dot_product_attention(*args, attn_mask=mask, is_causal=kind == "causal")
        out.to(torch.bfloat16).sum().backward()

    return step


def ms_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {args.threads} | {args.rounds} rounds x {args.steps} fwd+bwd | "
          f"mmpt runs fp32 up to {CPU_FP32_ATTENTION_MAX_KEYS} keys")
    for b, h, n, d in SHAPES:
        for kind in ("full", "causal", "padded"):
            sides = {"bf16": step_fn(b, h, n, d, kind, fp32=False), "fp32": step_fn(b, h, n, d, kind, fp32=True)}
            times: dict[str, list[float]] = {name: [] for name in sides}
            for fn in sides.values():
                fn()  # warm-up
            for r in range(args.rounds):
                for name in (("bf16", "fp32") if r % 2 == 0 else ("fp32", "bf16")):
                    times[name].append(ms_per_step(sides[name], args.steps))
            lo, hi = statistics.median(times["bf16"]), statistics.median(times["fp32"])
            taken = "fp32" if n <= CPU_FP32_ATTENTION_MAX_KEYS else "bf16"
            print(f"b {b:3d} h {h:2d} n {n:4d} d {d:3d} {kind:7s}: bf16 kernel {lo:7.2f} ms | in fp32 {hi:7.2f} ms | "
                  f"bf16 / fp32 {lo / hi:5.2f} | mmpt takes {taken}")


if __name__ == "__main__":
    main()
