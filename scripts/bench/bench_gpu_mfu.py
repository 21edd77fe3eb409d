"""bf16 samples/s and MFU of the base presets on one GPU: the trainer's step, blocks compiled, flash SDPA, the
largest batch that fits (issue 13 item 8).

    python scripts/bench/bench_gpu_mfu.py [--models clip/base,coca/base,albef/base] [--batch 0] [--max-batch 1024]
        [--steps 20] [--warmup 3] [--no-compile] [--write docs/PERFORMANCE.md] [--device cuda]

Per model: built from its preset as `mmpt-train model=<arch>/<preset>` builds it, wrapped in the DeepSpeed engine
the trainer builds (`initialize_engine`) at `trainer.precision=bf16` (one process: stage 0, fused AdamW, clipping
at 1.0, the multi-tensor bf16 step) and stepped by the trainer's `micro_step` on random pairs that already sit on
the device (no loader: the step alone). The batch doubles from 8 in eager mode until a step runs out of memory or reaches
`--max-batch` (`--batch N` skips the search); then the blocks are compiled as `trainer.compile=true` compiles them
(inductor, once, at that batch) and `--steps` steps are timed after `--warmup` (synchronised wall clock).
TFLOP/s come from `step_flops` (the trainer's `train/tflops`) and MFU from the detected dense peak
(`mmpt/engine/mfu.py`). `--write FILE` replaces the table between the `<!-- gpu-mfu -->` markers of FILE.
Without a GPU it stops with one `error:` line; `--device cpu --models clip/tiny --max-batch 8 --steps 2
--no-compile` checks the script there (MFU blank).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from mmpt.data.batch import Batch

MARKER = "<!-- gpu-mfu -->"


def random_pairs(model_cfg, batch: int, device: str) -> Batch:
    """Random images and right-padded captions of the preset's sizes, on `device`."""
    gen = torch.Generator().manual_seed(0)
    size = model_cfg.vision.image_size
    vocab, seq = model_cfg.text.vocab_size, model_cfg.text.max_text_len
    ids = torch.randint(5, vocab - 1, (batch, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    keys = [f"{i:08d}" for i in range(batch)]
    images = torch.randn(batch, 3, size, size, generator=gen)
    pairs = Batch(images=images, input_ids=ids * mask, attention_mask=mask, keys=keys, image_ids=keys,
                  captions=[f"caption {i}" for i in range(batch)])
    return pairs.to(device, torch.bfloat16)


def build_engine(name: str, batch: int, compiled: bool):
    """(engine, model config, clip norm): the trainer's model and engine at bf16 (`initialize_engine`)."""
    from mmpt.engine.compile import compile_blocks
    from mmpt.engine.config import TrainConfig
    from mmpt.engine.engine_init import initialize_engine
    from mmpt.engine.optim import build_optimizer
    from mmpt.models.registry import build_model, preset_config

    arch, preset = name.split("/")
    model_cfg = preset_config(arch, preset)
    cfg = TrainConfig()
    cfg.trainer.precision, cfg.data.batch_size = "bf16", batch
    torch.manual_seed(0)
    model = build_model(model_cfg)
    if compiled:
        compile_blocks(model)
    engine, clip = initialize_engine(model, build_optimizer(model, cfg.optimizer), cfg, world_size=1)
    return engine, model_cfg, clip


def timed_steps(engine, batch: Batch, clip: float, steps: int, warmup: int, device: str) -> float:
    """Seconds per step after `warmup` steps (device synchronised around the timed ones)."""
    from mmpt.engine.trainer import micro_step

    # the model's own objective weights (CoCa: caption 2), 1.0 for the rest, as the trainer's loss.weights default
    weights = defaultdict(lambda: 1.0, getattr(engine.module, "default_loss_weights", None) or {})
    for _ in range(warmup):
        micro_step(engine, batch, weights, clip)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        micro_step(engine, batch, weights, clip)
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fits(name: str, batch: int, device: str) -> bool:
    """Does one eager training step at `batch` run without running out of device memory?"""
    engine = None
    try:
        engine, model_cfg, clip = build_engine(name, batch, compiled=False)
        timed_steps(engine, random_pairs(model_cfg, batch, device), clip, steps=1, warmup=1, device=device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()


def largest_batch(name: str, max_batch: int, device: str) -> int:
    batch, best = 8, 0
    while batch <= max_batch and fits(name, batch, device):
        best, batch = batch, batch * 2
    if best == 0:
        fail(f"{name} does not fit at batch 8 on {device}; nothing to measure")
    return best


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_markers(path: Path) -> None:
    """Refuse a `--write` target without its two markers before measuring anything."""
    if not path.is_file() or path.read_text().count(MARKER) != 2:
        fail(f"{path} needs exactly two '{MARKER}' lines around the GPU table (docs/PERFORMANCE.md has them)")


def write_table(path: Path, rows: list[str], command: str) -> None:
    """Replace the text between the two markers of `path` with the table (markers kept)."""
    text = path.read_text()
    head, _, rest = text.partition(MARKER)
    _, _, tail = rest.partition(MARKER)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = "\n".join([
        f"{datetime.date.today()}, {device}, torch {torch.__version__}: `{command}`", "",
        "| model | batch | samples/s | TFLOP/s | MFU |", "|---|---|---|---|---|", *rows])
    path.write_text(f"{head}{MARKER}\n{table}\n{MARKER}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="clip/base,coca/base,albef/base")
    ap.add_argument("--batch", type=int, default=0, help="per-model batch (0: the largest power of two that fits)")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu only checks the script (base models take minutes a step)")
    ap.add_argument("--write", type=Path, default=None, help="a markdown file with two gpu-mfu markers")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("no GPU here: this bench measures GPU throughput; `--device cpu --models clip/tiny --max-batch 8 "
             "--steps 2 --no-compile` checks the script on CPU")
    if args.write is not None:
        check_markers(args.write)

    from mmpt.engine.dist_env import init_process_group
    from mmpt.engine.mfu import peak_tflops
    from mmpt.engine.run_setup import current_env
    from mmpt.models.protocol import step_flops

    init_process_group(current_env(), 600)  # the trainer's one-rank group (DeepSpeed needs one)
    peak = peak_tflops(None, "bf16")
    rows = []
    for name in args.models.split(","):
        batch = args.batch or largest_batch(name, args.max_batch, args.device)
        engine, model_cfg, clip = build_engine(name, batch, compiled=not args.no_compile)
        pairs = random_pairs(model_cfg, batch, args.device)
        seconds = timed_steps(engine, pairs, clip, args.steps, args.warmup, args.device)
        tflops = step_flops(engine.module, pairs) / seconds / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "-"
        rows.append(f"| `{name}` | {batch} | {batch / seconds:,.1f} | {tflops:.1f} | {mfu} |")
        print(rows[-1], flush=True)
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.write is not None:
        write_table(args.write, rows, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
