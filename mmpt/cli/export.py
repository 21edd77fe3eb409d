"""`mmpt-export PATH --out DIR [--format mmpt|hf]`: a trained model out of its DeepSpeed checkpoint.

PATH: a run dir (its newest complete checkpoint), a checkpoint tag dir, or an earlier export.
mmpt: model.safetensors (fp32, no DeepSpeed internals, no EMA teachers / feature queues), config.yaml,
      tokenizer.json, export.json, README.md (model card); `mmpt.load(DIR)` reads it.
hf:   a Hugging Face `transformers` CLIPModel directory (CLIP configurations HF can express).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpt.cli.common import fail, user_errors_exit
from mmpt.engine.config import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmpt-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run dir, checkpoints/step_* dir, or an mmpt-export dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("mmpt", "hf"), default="mmpt", help="mmpt (default) or hf (transformers CLIPModel)")
    return p.parse_args(argv)


@user_errors_exit
def export(argv: list[str]) -> Path:
    args = parse_args(argv)
    from mmpt.engine.export import write_mmpt_export
    from mmpt.engine.saved_model import build_saved_model, read_saved

    saved = read_saved(args.path)
    model = build_saved_model(saved)  # weights that do not fit their config: a ConfigError
    out = Path(args.out).expanduser()
    if out.resolve() == saved.source.resolve():
        raise ConfigError(f"--out {out} is the directory being exported; choose another directory")
    if args.format == "hf":
        try:
            from mmpt.interop.hf_clip import export_hf_clip
        except ImportError as exc:
            raise ConfigError(f"--format hf is unavailable in this install ({exc}); use --format mmpt") from None
        data = saved.config.data  # a configuration HF's CLIPModel cannot express raises a ConfigError
        export_hf_clip(model, saved.tokenizer_file, out, image_mean=list(data.mean), image_std=list(data.std))
    else:
        write_mmpt_export(saved, model, out)
    print(f"exported {saved.source} ({args.format}) to {out}", flush=True)
    return out


def main() -> None:
    argv = sys.argv[1:]
    if not argv:
        fail("missing PATH; usage: mmpt-export RUN_DIR --out DIR [--format mmpt|hf]")
    export(argv)


if __name__ == "__main__":
    main()
