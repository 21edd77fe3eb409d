"""Tiny models saved the way `mmpt-train` saves them, without training: for mmpt.load / mmpt-export tests.

A checkpoint tag dir here has exactly the files `load_model_weights` and `mmpt-eval` read from a DeepSpeed
stage-0 fp32 tag (`mp_rank_00_model_states.pt` with the module state dict under "module"), plus the
`config.yaml` (the validated, resolved config), `tokenizer.json` and `complete` marker the trainer writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from mmpt.cli.common import CONF_DIR
from mmpt.engine.checkpoint import COMPLETE_MARKER, tag_for
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.run_setup import validate
from mmpt.models.registry import build_model

SINGLE = DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")
TINY_DATA = ["data.image_size=32", "data.eval.urls=null"]


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def save_tag_dir(run_dir: Path, arch: str, overrides: list[str] = (), step: int = 7, seed: int = 0,
                 perturb: float = 0.0) -> tuple[Path, nn.Module]:
    """A freshly built `<arch>/tiny` (or `arch/preset`) model saved as `<run_dir>/checkpoints/step_<step>`; needs the
    demo env. `perturb`: noise added to every parameter, so LayerNorms and biases are not at their init values."""
    preset = arch if "/" in arch else f"{arch}/tiny"
    prep = validate(composed([f"model={preset}", *TINY_DATA, *overrides]), SINGLE, need_train=False)
    torch.manual_seed(seed)
    model = build_model(prep.cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * perturb)
    tag = run_dir / "checkpoints" / tag_for(step)
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(prep.resolved)))
    shutil.copyfile(prep.cfg.tokenizer.path, tag / "tokenizer.json")
    (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 1}))
    return tag, model
