"""bf16 attention on CPU: torch's bf16 kernel vs the kernel on fp32 upcasts vs bf16 matmuls around an fp32 softmax.

    python scripts/bench/bench_cpu_attention.py [--threads 1] [--rounds 7] [--steps 4]

Why mmpt's `attend` picks a path for low-precision attention on CPU (`cpu_attention_path`): for each shape
`b h n d` (full, causal and key-padded), q, k and v are the strided views of one bf16 `b n 3(h d)` projection, as
`Attention` makes them, and one step is forward + backward to them. Rounds alternate the three sides (`--steps`
steps each); the medians of milliseconds per step are printed with each side's ratio to the bf16 kernel (> 1:
faster than it) and the path mmpt takes. The shapes cover the tiny presets (32-97 tokens, heads of 32), the
bench models (heads of 64), ViT-B/16 at 224 px (197) and longer sequences.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from mmpt.modules.attention import cpu_attention_path, make_attn_mask, matmul_attention

SHAPES = [(64, 1, 17, 64), (32, 2, 32, 64), (32, 2, 65, 64), (32, 2, 97, 64), (16, 2, 128, 64), (16, 4, 128, 32),
          (16, 2, 197, 64), (16, 12, 197, 64), (16, 4, 197, 32), (16, 2, 257, 64), (8, 2, 325, 64), (8, 2, 401, 64)]
SIDES = ("bf16 kernel", "fp32 kernel", "matmul")


def step_fn(b: int, h: int, n: int, d: int, kind: str, side: str) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3 * h * d, generator=gen, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(b, n, h * d, generator=gen, dtype=torch.bfloat16)
    mask = None
    if kind == "padded":
        keep = torch.ones(b, n, dtype=torch.long)
        keep[: b // 2, n // 2:] = 0
        mask = make_attn_mask(n, n, keep)
    causal = kind == "causal"

    def step() -> None:
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=h)
        if side == "matmul":
            out = matmul_attention(q, k, v, mask, causal, 0.0)
        else:
            args = (q.float(), k.float(), v.float()) if side == "fp32 kernel" else (q, k, v)
            out = F.scaled_dot_product_attention(*args, attn_mask=mask, is_causal=causal)
            out = rearrange(out.to(torch.bfloat16), "b h n d -> b n (h d)")
        out.backward(grad)

    return step


def ms_per_step(step: Callable[[], None], steps: int) -> float:
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
          "ms per step (median), speed-up over the bf16 kernel in brackets")
    for b, h, n, d in SHAPES:
        for kind in ("full", "causal", "padded"):
            sides = {side: step_fn(b, h, n, d, kind, side) for side in SIDES}
            times: dict[str, list[float]] = {side: [] for side in sides}
            for fn in sides.values():
                fn()  # warm-up
            for r in range(args.rounds):
                for side in SIDES[r % 3:] + SIDES[: r % 3]:  # rotate which side goes first
                    times[side].append(ms_per_step(sides[side], args.steps))
            med = {side: statistics.median(t) for side, t in times.items()}
            probe = torch.zeros(1, 1, n, d, dtype=torch.bfloat16)
            taken = cpu_attention_path(probe, probe) or "bf16 kernel"
            cells = " | ".join(f"{side} {med[side]:7.2f} ({med['bf16 kernel'] / med[side]:4.2f}x)" for side in SIDES)
            print(f"b {b:3d} h {h:2d} n {n:4d} d {d:3d} {kind:7s}: {cells} | mmpt takes {taken}")


if __name__ == "__main__":
    main()
