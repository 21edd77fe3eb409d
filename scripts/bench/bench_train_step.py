"""Throughput of mmpt's training step vs. a bare PyTorch loop: same tiny CLIP, same in-memory batch.

    python scripts/bench/bench_train_step.py [--steps 1] [--rounds 40] [--batch 64] [--precision fp32|bf16]
        [--zero 0 1 2] [--threads 1 2] [--before]

Both loops do forward, backward, gradient clipping to 1.0 and an AdamW step with the warm-up/cosine schedule.
The mmpt side is the trainer's step: the DeepSpeed engine built from mmpt's DeepSpeed config exactly as the
trainer builds it (build_deepspeed_config, skip_single_rank_allreduce, mmpt_grad_clip), Batch.to, micro_step,
and the per-step stats bookkeeping (IntervalStats.add, the gradient norm; one reduce per `--log-every`).
On one process ZeRO-1/2 run as stage 0 (ds_config.single_rank_zero_stage); `--before` adds, for each stage, a
side that drives DeepSpeed as mmpt did before that (the configured stage, DeepSpeed's own clipping and its
all-reduce with itself). For each thread count, rounds alternate all sides (`--steps` steps each: short
rounds, many of them, so bursts of load on a shared machine fall on single rounds and the median skips them);
prints medians of samples/s by wall clock and by process CPU time (on a loaded machine CPU time is the steadier
measure of work) and each ratio mmpt / bare.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from bench_batches import make_batch  # scripts/bench/, the directory of this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--before", action="store_true",
                    help="add sides with the configured stage, DeepSpeed's clipping and self all-reduce (mmpt before)")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")

    import deepspeed

    from mmpt.engine.config import OptimizerConfig, SchedulerConfig, TrainConfig
    from mmpt.engine.ds_config import build_deepspeed_config, mmpt_grad_clip, skip_single_rank_allreduce
    from mmpt.engine.optim import build_optimizer, build_scheduler
    from mmpt.engine.trainer import PRECISION_DTYPES, IntervalStats, micro_step
    from mmpt.models.clip import build_clip
    from mmpt.models.registry import preset_config

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = PRECISION_DTYPES[args.precision]
    model_cfg = preset_config("clip", "tiny", text={"vocab_size": 1000, "max_text_len": 32})  # = model=clip/tiny
    opt_cfg, sched_cfg = OptimizerConfig(lr=1e-3), SchedulerConfig(warmup_steps=10)
    text = model_cfg.text
    batch = make_batch(args.batch, model_cfg.vision.image_size, text.max_text_len, text.vocab_size).to(device, dtype)
    total_steps = (args.steps * args.rounds + 10) * len(args.threads) + 10

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

    def mmpt_step_for(stage: int, before: bool) -> tuple[Callable[[], None], int]:
        torch.manual_seed(0)
        cfg = TrainConfig()
        cfg.data.batch_size, cfg.trainer.precision, cfg.trainer.grad_clip = args.batch, args.precision, 1.0
        cfg.deepspeed = {"zero_optimization": {"stage": stage}}
        ds_config = build_deepspeed_config(cfg, world_size=1, keep_zero_stage=before)
        if before:
            ds_config["gradient_clipping"] = cfg.trainer.grad_clip
        model = build_clip(model_cfg)
        optimizer = build_optimizer(model, opt_cfg)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=build_scheduler(optimizer, sched_cfg, total_steps),
                                               config=ds_config)
        if not before:
            skip_single_rank_allreduce(engine, world_size=1)
        grad_clip, weights = 0.0 if before else mmpt_grad_clip(cfg, ds_config), {"itc": 1.0}
        stats = [IntervalStats()]

        def step() -> None:  # what Trainer._micro_step and its loop do per step with grad_accum=1
            out, total = micro_step(engine, batch.to(device, dtype), weights, grad_clip)
            stats[0].add({"loss": total, **out.losses, **out.metrics})
            stats[0].add_grad_norm(engine.get_global_grad_norm())
            if stats[0].micro_steps == args.log_every:
                stats[0].reduce(), stats[0].grad_norm_summary()
                stats[0] = IntervalStats()

        return step, engine.zero_optimization_stage()

    sides: dict[str, Callable[[], None]] = {"bare": bare_step}
    for stage in args.zero:
        for before in (False, True) if args.before else (False,):
            step, ran_as = mmpt_step_for(stage, before)
            ran = f" (ran as stage {ran_as})" if ran_as != stage else ""
            sides[f"ZeRO-{stage}" + (" before" if before else "") + ran] = step

    def timed(step_fn: Callable[[], None]) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        n = args.steps * args.batch
        return n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9)

    print(f"device {device} | precision {args.precision} | batch {args.batch} | {args.steps} steps x "
          f"{args.rounds} rounds | samples/s medians: wall (CPU time)")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for fn in sides.values():  # warm-up at this thread count
            for _ in range(3):
                fn()
        wall: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                w, c = timed(fn)
                wall[name].append(w)
                cpu[name].append(c)
        bw, bc = statistics.median(wall["bare"]), statistics.median(cpu["bare"])
        for name in sides:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            print(f"threads {threads} | {name:28s}: {w:7.1f} ({c:7.1f}) samples/s | ratio vs bare {w / bw:.3f} "
                  f"(CPU {c / bc:.3f})")


if __name__ == "__main__":
    main()
