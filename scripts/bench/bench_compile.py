"""Does `trainer.compile=true` pay? Training-step throughput of compiled vs eager blocks, same model and batch.

    python scripts/bench/bench_compile.py [--model clip/tiny] [--batch 64] [--steps 20] [--rounds 3]
        [--backend inductor] [--precision fp32|bf16] [--zero 0|1|2] [--threads 1]

Both sides are the trainer's step (mmpt.engine.trainer.micro_step through a DeepSpeed engine) on identically
initialised models; the compiled side has `mmpt.engine.compile.compile_blocks` applied before
`deepspeed.initialize`, exactly as the trainer does. The first compiled steps (compilation) are timed apart;
then rounds alternate between the two so machine noise hits both. Prints samples/s, the ratio, and how many
steps the compile time takes to win back.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clip/tiny", help="arch/preset")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--zero", type=int, default=1, choices=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29518")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")

    import deepspeed
    from bench_train_step import make_batch

    from mmpt.engine.compile import compile_blocks
    from mmpt.engine.config import OptimizerConfig, TrainConfig
    from mmpt.engine.ds_config import build_deepspeed_config
    from mmpt.engine.optim import build_optimizer
    from mmpt.engine.trainer import PRECISION_DTYPES, micro_step
    from mmpt.models.registry import build_model, preset_config

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch, preset = args.model.split("/")
    model_cfg = preset_config(arch, preset)
    grid = model_cfg.patch_grid()
    text = model_cfg.text
    batch = make_batch(args.batch, grid.image_size, text.max_text_len, text.vocab_size)
    batch = batch.to(device, PRECISION_DTYPES[args.precision])
    weights = dict.fromkeys(model_cfg.objectives, 1.0)

    def engine_for(compiled: bool):
        torch.manual_seed(0)
        model = build_model(model_cfg)
        if compiled:
            compile_blocks(model, args.backend)
        cfg = TrainConfig()
        cfg.data.batch_size, cfg.trainer.precision = args.batch, args.precision
        cfg.deepspeed = {"zero_optimization": {"stage": args.zero}}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OptimizerConfig(lr=1e-4)),
                                               config=build_deepspeed_config(cfg, world_size=1))
        return engine

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(engine, steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            micro_step(engine, batch, weights)
        sync()
        return time.perf_counter() - start

    eager, compiled = engine_for(False), engine_for(True)
    first_eager = timed(eager, 2)
    first_compiled = timed(compiled, 2)  # compiles the train-mode graphs (forward and backward)
    eager_rates, compiled_rates = [], []
    for _ in range(args.rounds):
        eager_rates.append(args.steps * args.batch / timed(eager, args.steps))
        compiled_rates.append(args.steps * args.batch / timed(compiled, args.steps))
    e, c = statistics.median(eager_rates), statistics.median(compiled_rates)
    print(f"{args.model} | device {device} | backend {args.backend} | precision {args.precision} | ZeRO-{args.zero} | "
          f"batch {args.batch} | {args.steps} steps x {args.rounds} rounds | threads {args.threads}")
    print(f"first 2 steps     : eager {first_eager:.1f} s, compiled {first_compiled:.1f} s (compilation)")
    print(f"eager blocks      : {e:8.1f} samples/s  (rounds: {', '.join(f'{r:.1f}' for r in eager_rates)})")
    print(f"compiled blocks   : {c:8.1f} samples/s  (rounds: {', '.join(f'{r:.1f}' for r in compiled_rates)})")
    print(f"ratio compiled / eager: {c / e:.3f}")
    saved_per_step = args.batch / e - args.batch / c
    overhead = first_compiled - first_eager
    if saved_per_step > 0:
        print(f"compile time won back after ~{overhead / saved_per_step:.0f} steps")
    else:
        print("compiled steps are not faster: the compile time is never won back")


if __name__ == "__main__":
    main()
