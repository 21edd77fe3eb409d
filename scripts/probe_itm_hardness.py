"""Does a tiny ALBEF's ITM head learn under a given hard-negative schedule? (single process, demo shards)

    python scripts/probe_itm_hardness.py --shards 'demo/train/{00000..00019}.tar' --tokenizer demo/tokenizer.json \
        --hardness-warmup 0      # ALBEF: hard negatives from step 0
    python scripts/probe_itm_hardness.py ... --hardness-warmup 3000 --uniform   # uniform negatives

Trains ITC + ITM (MLM weight 0, no momentum) for --steps steps and prints the losses and ITM accuracy on
positives every 50 steps. Measured numbers are in docs/RESULTS.md.
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from mmpt.cli.common import CONF_DIR
from mmpt.data.pipeline import build_train_loader
from mmpt.data.tokenizer import load_tokenizer
from mmpt.engine.config import OptimizerConfig
from mmpt.engine.optim import build_optimizer
from mmpt.models import albef
from mmpt.models.registry import build_model


def uniform_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
    """Any other row of the batch, uniformly (ignores similarities)."""
    b, n = sim_i2t.shape
    idx = (torch.arange(b)[None] + torch.randint(1, n, (2, b))) % n
    return idx[0], idx[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hardness-warmup", type=int, default=0)
    ap.add_argument("--uniform", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.uniform:
        albef.sample_hard_negatives = uniform_negatives
    tok = load_tokenizer(args.tokenizer, 24)
    cfg = OmegaConf.load(CONF_DIR / "model" / "albef" / "tiny.yaml")
    cfg.image_size, cfg.vocab_size, cfg.max_text_len = 64, max(1000, tok.vocab_size), 24
    cfg.momentum.enabled, cfg.itm_hardness_warmup_steps = False, args.hardness_warmup
    model = build_model(OmegaConf.to_container(cfg))
    opt = build_optimizer(model, OptimizerConfig(lr=args.lr, weight_decay=0.05))
    loader = build_train_loader(args.shards, tok, batch_size=64, image_size=64, num_workers=0, seed=0, rank=0,
                                world_size=1, scale=(0.85, 1.0))
    for step, batch in zip(range(args.steps), loader):
        out = model(batch)
        loss = out.losses["itc"] + out.losses["itm"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.after_optimizer_step(step + 1)
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} | itc {out.losses['itc']:.3f} | itm {out.losses['itm']:.3f} | "
                  f"itm_acc_pos {out.metrics['itm_acc_pos']:.3f}", flush=True)


if __name__ == "__main__":
    main()
