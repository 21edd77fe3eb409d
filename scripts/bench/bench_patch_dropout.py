"""Training throughput with patch dropout (FLIP) vs without, on one model: `model.patch_dropout=0.5` vs 0.

    python scripts/bench/bench_patch_dropout.py [--image-size 224] [--patch 16] [--p 0.5] [--batch 32]
        [--steps 4] [--rounds 20] [--threads 1]

The model is `clip/tiny` (64 wide x 2 blocks per tower, 32-token captions) with its ViT scaled to
`--image-size` px at `--patch` px patches (default 224 / 16: ViT-B/16's 196 patches). One model, one AdamW
optimizer, one in-memory batch; a step is forward + backward + optimizer step. Rounds alternate between
p = 0 and p = `--p` (and which goes first), by switching the model's PatchDropout rate in place, so machine
noise hits both; prints samples/s per round, the medians and their ratio. Beside wall-clock samples/s it
prints samples per CPU-second of this process (`time.process_time`): with one thread on a machine shared
with other jobs, that one counts the work done and not the time spent waiting for a core.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_batch(batch: int, image_size: int, seq_len: int, vocab: int):
    from mmpt.data.batch import Batch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=gen)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[:, seq_len // 2 :] = 0
    ids[mask == 0] = 0
    return Batch(images=torch.randn(batch, 3, image_size, image_size, generator=gen), input_ids=ids,
                 attention_mask=mask, image_ids=[str(i) for i in range(batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mmpt.engine.config import OptimizerConfig
    from mmpt.engine.optim import build_optimizer
    from mmpt.models.clip import build_clip
    from mmpt.models.registry import preset_config

    cfg = preset_config("clip", "tiny", vision={"image_size": args.image_size, "patch_size": args.patch},
                        text={"vocab_size": 1000, "max_text_len": 32}, patch_dropout=args.p)
    torch.manual_seed(0)
    model = build_clip(cfg).train()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-4))
    batch = make_batch(args.batch, args.image_size, cfg.text.max_text_len, cfg.text.vocab_size)
    dropout = model.visual.patch_dropout
    n = model.visual.patch_embed.num_patches

    def step() -> None:
        loss = model(batch).losses["itc"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(p: float) -> tuple[float, float]:
        """(samples per wall second, samples per CPU second of this process) over `args.steps` steps."""
        dropout.p = p
        step()  # one untimed step after the switch
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            step()
        samples = args.steps * args.batch
        return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)

    print(f"clip/tiny at {args.image_size} px / patch {args.patch}: {n} patches, p={args.p} keeps "
          f"{model.visual.num_train_tokens - 1}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"batch {args.batch}, {args.threads} thread(s), {args.steps} steps x {args.rounds} rounds per side")
    flops = {}
    for p in (0.0, args.p):
        dropout.p = p
        flops[p] = model.flops_per_sample()
    print(f"training GFLOPs per sample (flops_per_sample): p=0 {flops[0.0] / 1e9:.3f}, p={args.p} "
          f"{flops[args.p] / 1e9:.3f} -> {flops[0.0] / flops[args.p]:.2f}x fewer")
    rates: dict[float, list[tuple[float, float]]] = {0.0: [], args.p: []}
    for r in range(args.rounds):
        order = (0.0, args.p) if r % 2 == 0 else (args.p, 0.0)
        for p in order:
            rates[p].append(timed(p))
        (b_wall, b_cpu), (d_wall, d_cpu) = rates[0.0][-1], rates[args.p][-1]
        print(f"round {r}: wall p=0 {b_wall:.1f} / p={args.p} {d_wall:.1f} samples/s ({d_wall / b_wall:.2f}x); "
              f"cpu {b_cpu:.1f} / {d_cpu:.1f} samples/cpu-s ({d_cpu / b_cpu:.2f}x)")
    for i, unit in enumerate(("samples/s (wall)", "samples/cpu-s")):
        base = statistics.median(x[i] for x in rates[0.0])
        drop = statistics.median(x[i] for x in rates[args.p])
        per_round = statistics.median(d[i] / b[i] for d, b in zip(rates[args.p], rates[0.0]))
        print(f"median {unit}: p=0 {base:.1f}, p={args.p} {drop:.1f} -> {drop / base:.2f}x "
              f"(median of per-round ratios {per_round:.2f}x)")


if __name__ == "__main__":
    main()
