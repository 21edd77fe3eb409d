"""ALBEF's training step with the MLM head on the masked rows only vs. at every text position.

    python scripts/bench/bench_albef_mlm_rows.py [--steps 20] [--rounds 3] [--batch 64] [--threads 1]

The tiny ALBEF of `experiment=albef_tiny model.momentum.enabled=true` (2 text + 2 fusion layers, momentum
teacher, vocab 1,000, 24 tokens, 64 px), same in-memory batch, forward + backward + AdamW, one process. The baseline scores
every position: `masked_rows` is swapped for one that returns all `b l` rows with their labels (the loss is
identical, tests/test_mlm.py). Rounds alternate between the two so that machine noise hits both; prints
samples/s and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def every_row(labels: torch.Tensor, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: every position is a row (what the model did before `masked_rows`)."""
    flat = labels.reshape(-1)
    return torch.arange(flat.numel(), device=flat.device), flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mmpt.models.albef as albef_module
    from mmpt.data.batch import Batch
    from mmpt.models.registry import preset_config
    from mmpt.objectives.mlm import masked_rows

    # mmpt/conf/experiment/albef_tiny.yaml's model with model.momentum.enabled=true: the tiny preset (64 px / patch 8,
    # ViT 64 x 2, 64-d ITC, queue 1,024) with 2 text + 2 fusion layers, 24 tokens, the default 1,000-token vocab
    cfg = preset_config("albef", "tiny", text={"layers": 2, "max_text_len": 24}, fusion_layers=2,
                        contrastive={"duplicate_positives": True}, momentum={"enabled": True, "decay": 0.99})
    gen = torch.Generator().manual_seed(0)
    b, seq = args.batch, cfg.text.max_text_len
    ids = torch.randint(5, cfg.text.vocab_size, (b, seq), generator=gen)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[:, seq // 2:] = 0
    ids[mask == 0] = 0
    batch = Batch(images=torch.randn(b, 3, 64, 64, generator=gen), input_ids=ids, attention_mask=mask,
                  image_ids=[str(i) for i in range(b)])
    torch.manual_seed(0)
    model = albef_module.build_albef(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        out = model(batch)
        sum(out.losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step(1)

    def timed(rows_fn: Callable) -> float:
        albef_module.masked_rows = rows_fn
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return args.steps * b / (time.perf_counter() - start)

    every, masked = [], []
    for _ in range(args.rounds):
        every.append(timed(every_row))
        masked.append(timed(masked_rows))
    e, m = statistics.median(every), statistics.median(masked)
    print(f"tiny ALBEF step | batch {b} | {args.steps} steps x {args.rounds} rounds | threads {args.threads}")
    print(f"MLM head at every position : {e:7.1f} samples/s  (rounds: {', '.join(f'{r:.1f}' for r in every)})")
    print(f"MLM head at masked rows    : {m:7.1f} samples/s  (rounds: {', '.join(f'{r:.1f}' for r in masked)})")
    print(f"ratio masked / every       : {m / e:.3f}")


if __name__ == "__main__":
    main()
