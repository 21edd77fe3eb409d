"""Training throughput with patch dropout (FLIP) vs without, on one model: `model.patch_dropout=0.5` vs 0.

    python scripts/bench/bench_patch_dropout.py [--image-size 224] [--patch 16] [--p 0.5] [--batch 32]
        [--steps 10] [--rounds 6] [--threads 1]

The model is `clip/tiny` (64 wide x 2 blocks per tower, 32-token captions) with its ViT scaled to
`--image-size` px at `--patch` px patches (default 224 / 16: ViT-B/16's 196 patches). One model, one AdamW
optimizer, one in-memory batch; a step is forward + backward + optimizer step. Rounds alternate between
p = 0 and p = `--p` (and which goes first), by switching the model's PatchDropout rate in place, so machine
noise hits both; prints samples/s per round, the medians and their ratio.
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
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=6)
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

    def timed(p: float) -> float:
        dropout.p = p
        step()  # one untimed step after the switch
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return args.steps * args.batch / (time.perf_counter() - start)

    print(f"clip/tiny at {args.image_size} px / patch {args.patch}: {n} patches, p={args.p} keeps "
          f"{model.visual.num_train_tokens - 1}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"batch {args.batch}, {args.threads} thread(s), {args.steps} steps x {args.rounds} rounds per side")
    flops = {}
    for p in (0.0, args.p):
        dropout.p = p
        flops[p] = model.flops_per_sample()
    print(f"training GFLOPs per sample (flops_per_sample): p=0 {flops[0.0] / 1e9:.3f}, p={args.p} "
          f"{flops[args.p] / 1e9:.3f} -> {flops[0.0] / flops[args.p]:.2f}x fewer")
    rates: dict[float, list[float]] = {0.0: [], args.p: []}
    for r in range(args.rounds):
        order = (0.0, args.p) if r % 2 == 0 else (args.p, 0.0)
        for p in order:
            rates[p].append(timed(p))
        print(f"round {r}: p=0 {rates[0.0][-1]:.1f} samples/s, p={args.p} {rates[args.p][-1]:.1f} samples/s, "
              f"ratio {rates[args.p][-1] / rates[0.0][-1]:.2f}x")
    base, drop = statistics.median(rates[0.0]), statistics.median(rates[args.p])
    per_round = statistics.median(d / b for d, b in zip(rates[args.p], rates[0.0]))
    print(f"median: p=0 {base:.1f} samples/s, p={args.p} {drop:.1f} samples/s -> {drop / base:.2f}x "
          f"(median of per-round ratios {per_round:.2f}x)")


if __name__ == "__main__":
    main()
