"""Throughput of mmpt's training step vs. a bare PyTorch loop: same tiny CLIP, same in-memory batch.

    python scripts/bench/bench_train_step.py [--steps 40] [--rounds 3] [--batch 64] [--precision fp32|bf16]
        [--zero 0|1|2] [--threads 1]

Both loops do forward, backward, gradient clipping and an AdamW step with the warm-up/cosine schedule; the
mmpt loop goes through the DeepSpeed engine exactly as the trainer does (mmpt.engine.trainer.micro_step).
Rounds alternate between the two so that machine noise hits both. Prints samples/s and the ratio.
"""
from __future__ import annotations

import argparse
import os
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
    return Batch(images=torch.randn(batch, 3, image_size, image_size, generator=gen), input_ids=ids, attention_mask=mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--zero", type=int, default=1, choices=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")

    import deepspeed

    from mmpt.engine.config import OptimizerConfig, SchedulerConfig, TrainConfig
    from mmpt.engine.ds_config import build_deepspeed_config
    from mmpt.engine.optim import build_optimizer, build_scheduler
    from mmpt.engine.trainer import PRECISION_DTYPES, micro_step
    from mmpt.models.clip import build_clip
    from mmpt.models.registry import preset_config

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = PRECISION_DTYPES[args.precision]
    model_cfg = preset_config("clip", "tiny", text={"vocab_size": 1000, "max_text_len": 32})  # = model=clip/tiny
    opt_cfg, sched_cfg = OptimizerConfig(lr=1e-3), SchedulerConfig(warmup_steps=10)
    text = model_cfg.text
    batch = make_batch(args.batch, model_cfg.vision.image_size, text.max_text_len, text.vocab_size).to(device, dtype)
    total_steps = (args.steps + 5) * args.rounds + 10

    torch.manual_seed(0)
    bare = build_clip(model_cfg).to(device, dtype)
    bare_opt = build_optimizer(bare, opt_cfg)
    bare_sched = build_scheduler(bare_opt, sched_cfg, total_steps)

    def bare_step() -> None:
        loss = bare(batch).losses["itc"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        bare_sched.step()

    torch.manual_seed(0)
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.trainer.precision = args.batch, args.precision
    cfg.deepspeed = {"zero_optimization": {"stage": args.zero}}
    model = build_clip(model_cfg)
    optimizer = build_optimizer(model, opt_cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=build_scheduler(optimizer, sched_cfg, total_steps),
                                           config=build_deepspeed_config(cfg, world_size=1))

    def mmpt_step() -> None:
        micro_step(engine, batch, {"itc": 1.0})

    def timed(step_fn) -> float:
        for _ in range(3):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch / (time.perf_counter() - start)

    bare_rates, mmpt_rates = [], []
    for _ in range(args.rounds):
        bare_rates.append(timed(bare_step))
        mmpt_rates.append(timed(mmpt_step))
    b, m = statistics.median(bare_rates), statistics.median(mmpt_rates)
    print(f"device {device} | precision {args.precision} | ZeRO-{args.zero} | batch {args.batch} | "
          f"{args.steps} steps x {args.rounds} rounds | threads {args.threads}")
    print(f"bare PyTorch loop : {b:8.1f} samples/s  (rounds: {', '.join(f'{r:.1f}' for r in bare_rates)})")
    print(f"mmpt trainer step : {m:8.1f} samples/s  (rounds: {', '.join(f'{r:.1f}' for r in mmpt_rates)})")
    print(f"ratio mmpt / bare : {m / b:.3f}")


if __name__ == "__main__":
    main()
