"""Does a tiny ALBEF's / VLMo's ITM head learn under a given hard-negative schedule? (single process, demo shards)

    python scripts/probe_itm_hardness.py --shards 'demo/train/{00000..00019}.tar' --tokenizer demo/tokenizer.json \
        --hardness-warmup 0      # hard negatives from step 0
    python scripts/probe_itm_hardness.py ... --uniform           # uniform negatives (hardness 0 at every step)
    python scripts/probe_itm_hardness.py ... --model vlmo --uniform --diag

    python scripts/probe_itm_hardness.py ... --model vlmo --init RUN_DIR --mlm-weight 1 --hardness-warmup 400
        # tiny VLMo stage 3 from a stage-2 run (experiment=vlmo_tiny_stage3_pairs, one process, constant lr)

Trains ITC + ITM (+ MLM with --mlm-weight; no momentum, constant lr, AdamW, grad clip 1) for --steps steps
and prints the losses and ITM accuracy on positives every --every steps. `--uniform` pins the model's
hardness to 0, so negatives are drawn uniformly from the allowed rows (the exclusion rules of
`hard_negative_rows` still apply: never the same image id or an identical caption). `--diag` adds the
pre-clipping gradient norms of the ITM head and the fusion side (VLMo `encoder.*`, ALBEF `text.*`), the norm
and batch spread of the ITM head's input, the hardness (softmax share of the draw) and ITC logit scale and the perplexity of the
image->text negative distribution (b - 1 = uniform, 1 = one certain partner). Measured numbers are in
docs/RESULTS.md. Positional `key=value` arguments override the model preset (e.g. `multiway.vl_layers=2`).
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from mmpt.data.pipeline import build_train_loader
from mmpt.data.tokenizer import load_tokenizer
from mmpt.engine.config import OptimizerConfig
from mmpt.engine.optim import build_optimizer
from mmpt.models.registry import build_model, model_config


def build(model: str, vocab_size: int, hardness_warmup: int, overrides: list[str]) -> torch.nn.Module:
    """The arch's `tiny` preset (what mmpt/conf/model/<model>/tiny.yaml names) at 64 px, 24 tokens, no momentum
    teacher, then the `key=value` overrides (nested keys: `multiway.vl_layers=2`, `text.layers=2`)."""
    text = {"vocab_size": max(1000, vocab_size), "max_text_len": 24}
    if model == "albef":
        towers = {"vision": {"image_size": 64}, "text": text, "momentum": {"enabled": False}}
    else:
        towers = {"multiway": {"image_size": 64, **text}}
    base = {"arch": model, "preset": "tiny", **towers, "itm": {"hardness_warmup_steps": hardness_warmup}}
    cfg = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(overrides))
    return build_model(model_config(cfg))


def grad_norm(model: torch.nn.Module, prefix: str) -> float:
    sq = [p.grad.float().pow(2).sum() for n, p in model.named_parameters()
          if n.startswith(prefix) and p.grad is not None]  # fmt: skip
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


@torch.no_grad()
def negative_perplexity(model: torch.nn.Module, batch) -> float:
    """exp(entropy) of the image->text negative distribution ITM draws from (mean over images): b - 1 = uniform."""
    from mmpt.objectives.itm import _negative_weights
    from mmpt.objectives.pair_codes import pair_image_codes, text_codes

    img = model.encode_image(batch.images)
    txt = model.encode_text(batch.input_ids, batch.attention_mask)
    b = img.shape[0]
    codes = pair_image_codes(batch.image_ids, b, img.device)
    caps = text_codes(batch.attention_mask * batch.input_ids)
    positive = torch.eye(b, dtype=torch.bool)
    same = (codes[:, None] == codes[None]) | (caps[:, None] == caps[None]) | positive
    w = _negative_weights(model.itc.scale() * img @ txt.T, same, positive, model.itm_hardness())
    return float((-(w * w.clamp_min(1e-30).log()).sum(1)).exp().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--model", choices=["albef", "vlmo"], default="albef")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--itm-weight", type=float, default=1.0)
    ap.add_argument("--itc-weight", type=float, default=1.0)
    ap.add_argument("--mlm-weight", type=float, default=0.0)
    ap.add_argument("--init", default=None, help="start from this mmpt run / checkpoint (model.init.checkpoint)")
    ap.add_argument("--hardness-warmup", type=int, default=0)
    ap.add_argument("--uniform", action="store_true", help="hardness 0 at every step (uniform allowed negatives)")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diag", action="store_true", help="also print grad norms and the ITM input's batch spread")
    ap.add_argument("overrides", nargs="*", help="model config overrides, e.g. multiway.vl_layers=2")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    tok = load_tokenizer(args.tokenizer, 24)
    model = build(args.model, tok.vocab_size, args.hardness_warmup, args.overrides)
    if args.init:
        from mmpt.engine.checkpoint import read_init_checkpoint
        from mmpt.models.pretrained import load_model_state

        load_model_state(model, read_init_checkpoint(args.init), args.init)
        model.after_optimizer_step(0)  # the checkpoint's step buffer belongs to the earlier run
    if args.uniform:
        model.itm_hardness = lambda: torch.zeros(())  # type: ignore[method-assign]
    pooled: list[torch.Tensor] = []
    model.itm_head.register_forward_hook(lambda _m, inp, _out: pooled.append(inp[0].detach()))
    opt = build_optimizer(model, OptimizerConfig(lr=args.lr, weight_decay=args.weight_decay))
    loader = build_train_loader(args.shards, tok, batch_size=args.batch_size, image_size=64, num_workers=0,
                                seed=args.seed, rank=0, world_size=1, scale=(0.85, 1.0))
    enc = "encoder." if args.model == "vlmo" else "text."
    for step, batch in zip(range(args.steps), loader):
        pooled.clear()
        out = model(batch)
        loss = args.itc_weight * out.losses["itc"] + args.itm_weight * out.losses["itm"]
        if args.mlm_weight:
            loss = loss + args.mlm_weight * out.losses["mlm"]
        opt.zero_grad()
        loss.backward()
        grads = f"grad itm_head {grad_norm(model, 'itm_head.'):.2e} {enc}{grad_norm(model, enc):.2e}" * args.diag
        total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        model.after_optimizer_step(step + 1)
        if (step + 1) % args.every == 0 or step == 0:
            line = (f"step {step + 1} | itc {out.losses['itc']:.3f} | itm {out.losses['itm']:.3f} | "
                    f"itm_acc_pos {out.metrics['itm_acc_pos']:.3f} | itm_acc {out.metrics['itm_acc']:.3f}")
            if args.diag:
                x = pooled[-1].float()  # `(3 b) d`: the ITM head's input
                line += (f" | {grads} total {total:.2e}"
                         f" | itm-in norm {x.norm(dim=1).mean():.2f} batch-std {x.std(dim=0).mean():.3f}"
                         f" | hardness {float(model.itm_hardness()):.2f} scale {float(model.itc.scale()):.2f}"
                         f" neg perplexity {negative_perplexity(model, batch):.1f}/{batch.images.shape[0] - 1}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
