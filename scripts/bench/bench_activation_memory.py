"""Peak memory of one training step (forward + backward) with and without `model.activation_checkpointing`.

    python scripts/bench/bench_activation_memory.py [--models clip/base albef/base] [--batch 8] [--threads 1]

Each (model, setting) runs in a fresh subprocess, so one measurement cannot inherit another's high-water mark.
On CPU the figure is peak RSS (`ru_maxrss`); on a GPU, `torch.cuda.max_memory_allocated`. Printed: the memory
held before the step (weights, plus everything the process imported), the peak during the step, the step's
own increase (activations kept for backward + gradients), and the ratios checkpointed / plain.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MIB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model_name: str, setting: bool, batch: int, threads: int) -> dict[str, float]:
    """One step of `model_name` (arch/preset) at `batch`: memory before, peak, seconds (run in a child)."""
    import torch
    import torch.utils.checkpoint

    from mmpt.data.batch import Batch
    from mmpt.models.registry import build_model, preset_config

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch, preset = model_name.split("/")
    cfg = preset_config(arch, preset, activation_checkpointing=setting)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    grid, vocab = cfg.patch_grid(), cfg.vocab_size()
    length = next(getattr(cfg, name).max_text_len for name in ("text", "multiway") if hasattr(cfg, name))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP], full length: the most activation memory
    images = torch.randn(batch, 3, grid.image_size, grid.image_size, generator=g)
    pairs = Batch(images=images, input_ids=ids, attention_mask=torch.ones_like(ids),
                  image_ids=[str(i) for i in range(batch)]).to(device, torch.float32)
    # both settings load checkpointing's lazy imports (~70 MiB of code on first use) before the baseline
    x = torch.ones(1, requires_grad=True)
    torch.utils.checkpoint.checkpoint(torch.nn.Identity(), x * 2, use_reentrant=False).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = float(torch.cuda.memory_allocated())
    else:
        before = float(rss_bytes())
    start = time.perf_counter()
    sum(model(pairs).losses.values()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = float(torch.cuda.max_memory_allocated())
    else:
        peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"before": before, "peak": peak, "seconds": time.perf_counter() - start, "device": device.type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["clip/base", "albef/base"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, setting = args.child
        print(json.dumps(measure(model, setting == "true", args.batch, args.threads)))
        return
    print(f"batch {args.batch} | one forward + backward per fresh process | threads {args.threads}")
    print(f"{'model':12s} {'checkpointing':>13s} {'before MiB':>11s} {'peak MiB':>9s} {'step MiB':>9s} {'s':>6s}")
    for model in args.models:
        rows = {}
        for setting in ("false", "true"):
            cmd = [sys.executable, __file__, "--child", model, setting, "--batch", str(args.batch),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = rows[setting] = json.loads(out.strip().splitlines()[-1])
            print(f"{model:12s} {setting:>13s} {r['before'] / MIB:11.0f} {r['peak'] / MIB:9.0f} "
                  f"{(r['peak'] - r['before']) / MIB:9.0f} {r['seconds']:6.1f}   ({r['device']})", flush=True)
        off, on = rows["false"], rows["true"]
        step_ratio = (on["peak"] - on["before"]) / (off["peak"] - off["before"])
        print(f"{model:12s} checkpointed / plain: peak {on['peak'] / off['peak']:.3f}, step {step_ratio:.3f}, "
              f"time {on['seconds'] / off['seconds']:.2f}x")


if __name__ == "__main__":
    main()
