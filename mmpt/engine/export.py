"""`mmpt-export --format mmpt`: a self-contained, DeepSpeed-free model directory that `mmpt.load` reads.

model.safetensors: the consolidated fp32 weights (`load_model_weights`), minus training-only state (momentum
teachers and feature queues: `training_only_keys`); config.yaml: the full train config the model was built
from, unchanged; tokenizer.json; export.json: source, step and last eval metrics; README.md: a model card.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from mmpt.engine.saved_model import (CONFIG_FILE, EXPORT_INFO, EXPORT_WEIGHTS, TOKENIZER_FILE, SavedModel,
                                     model_name, training_only_keys, unique_parameter_count)


def last_eval_metrics(saved: SavedModel) -> dict[str, float]:
    """The newest `eval/...` record of the run's metrics.jsonl at or before the exported step ({} if none)."""
    if saved.exported:
        return dict(saved.info.get("eval") or {})
    run_dir = saved.source.parent.parent  # <run>/checkpoints/step_X
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    found: dict[str, float] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if saved.step is not None and record.get("step", 0) > saved.step:
            continue
        evals = {k: v for k, v in record.items() if k.startswith("eval/")}
        if evals:
            found = evals
    return found


def _data_sources(config: Any) -> list[str]:
    sources = OmegaConf.select(config, "data.sources", default=None) or []
    if sources:
        return [f"{s.get('name') or s.get('kind')}: {s.get('urls')}" for s in sources]
    urls = OmegaConf.select(config, "data.train.urls", default=None)
    return [str(urls)] if urls else []


def model_card(saved: SavedModel, model: nn.Module, metrics: dict[str, float]) -> str:
    cfg = saved.config
    lines = [f"# {model_name(cfg)} (mmpt)", "",
             f"- architecture: `{cfg.model.arch}`, objectives {list(getattr(model, 'objectives', ()))}",
             f"- parameters: {unique_parameter_count(model):,} (tied weights counted once, EMA teachers excluded)",
             f"- image size {cfg.data.image_size}, text length {cfg.data.max_text_len}, "
             f"vocabulary {cfg.tokenizer.vocab_size}",
             f"- training steps: {saved.step if saved.step is not None else 'unknown'}, "
             f"precision {OmegaConf.select(cfg, 'trainer.precision', default='?')}",
             f"- exported from: `{saved.source}`", "", "## Training data", ""]
    lines += [f"- `{s}`" for s in _data_sources(cfg)] or ["- (not recorded)"]
    lines += ["", "## Evaluation (last eval of the run)", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())
                                                       if isinstance(v, (int, float))]
    else:
        lines += ["No evaluation recorded."]
    lines += ["", "## Use", "", "```python", "import mmpt", "m = mmpt.load(\"<this directory>\")",
              "emb = m.encode_image([pil_image]); txt = m.encode_text([\"a caption\"])", "```", ""]
    return "\n".join(lines)


def write_mmpt_export(saved: SavedModel, model: nn.Module, out_dir: Path) -> Path:
    """Write the export files into `out_dir` (created; existing files of the same names are replaced)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    skip = training_only_keys(model)
    # clone: tied weights share storage, which safetensors refuses; each key gets its own copy
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if k not in skip}
    save_file(tensors, str(out_dir / EXPORT_WEIGHTS), metadata={"format": "pt", "mmpt_arch": str(saved.config.model.arch)})
    metrics = last_eval_metrics(saved)
    (out_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(saved.config))
    info = {"source": str(saved.info.get("source", saved.source)), "step": saved.step, "eval": metrics}
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if saved.tokenizer_file.resolve() != (out_dir / TOKENIZER_FILE).resolve():
        shutil.copyfile(saved.tokenizer_file, out_dir / TOKENIZER_FILE)
    (out_dir / "README.md").write_text(model_card(saved, model, metrics))
    return out_dir
