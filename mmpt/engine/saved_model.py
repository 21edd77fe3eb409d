"""A trained model on disk, whatever its layout: a run dir, a checkpoint tag dir, or an `mmpt-export` dir.

One reader for `mmpt.load` and `mmpt-export`, so both see the same weights, config and tokenizer. No
process group and no DeepSpeed engine: a tag's consolidated fp32 weights come from `load_model_weights`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmpt.engine.config import ConfigError
from mmpt.engine.checkpoint import load_model_weights, resolve_checkpoint_dir, step_of
from mmpt.models.registry import build_model, model_config

EXPORT_WEIGHTS = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_INFO = "export.json"  # source, step, last eval metrics of an export


@dataclass
class SavedModel:
    config: DictConfig  # the full train config the model was built from (config.yaml)
    state_dict: dict[str, torch.Tensor]
    tokenizer_file: Path
    source: Path  # the tag dir or the export dir
    exported: bool
    step: int | None  # optimizer steps of the checkpoint (None when unknown)
    info: dict[str, Any] = field(default_factory=dict)  # an export's export.json


def is_export_dir(path: Path) -> bool:
    return (path / EXPORT_WEIGHTS).is_file() and (path / CONFIG_FILE).is_file()


def read_saved(path: str | Path) -> SavedModel:
    """Weights, config and tokenizer of a run dir / checkpoints dir / tag dir / export dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; give an mmpt run dir, one of its checkpoints/step_* "
                                "dirs, or a dir written by `mmpt-export`")
    if is_export_dir(p):
        from safetensors.torch import load_file

        config = OmegaConf.load(p / CONFIG_FILE)
        info = json.loads((p / EXPORT_INFO).read_text()) if (p / EXPORT_INFO).is_file() else {}
        return SavedModel(config, load_file(str(p / EXPORT_WEIGHTS)), _tokenizer_file(p, config), p, True,
                          info.get("step"), info)
    try:
        tag_dir = resolve_checkpoint_dir(p)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}, or a dir written by `mmpt-export` ({EXPORT_WEIGHTS} + {CONFIG_FILE})") from None
    if not (tag_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir} has no {CONFIG_FILE}; it was not written by mmpt-train")
    config = OmegaConf.load(tag_dir / CONFIG_FILE)
    return SavedModel(config, load_model_weights(tag_dir), _tokenizer_file(tag_dir, config), tag_dir, False,
                      step_of(tag_dir))


def _tokenizer_file(folder: Path, config: DictConfig) -> Path:
    """The tokenizer saved next to the weights; else the one the config names, if it is a local file."""
    if (folder / TOKENIZER_FILE).is_file():
        return folder / TOKENIZER_FILE
    named = OmegaConf.select(config, "tokenizer.path", default=None)
    if named and Path(named).expanduser().is_file():
        return Path(named).expanduser()
    raise FileNotFoundError(f"no {TOKENIZER_FILE} in {folder} and tokenizer.path={named!r} is not a file; "
                            f"copy the run's tokenizer to {folder / TOKENIZER_FILE}")


def training_only_keys(model: nn.Module) -> set[str]:
    """State-dict keys that inference never reads: momentum (EMA) teacher copies and ITC feature queues.

    They are training state: resuming needs them (DeepSpeed tags keep them), but embeddings, ITM and
    generation use only the student, and `model.init.checkpoint` re-syncs a teacher to the student when a
    checkpoint lacks it (`apply_init`), so an export that drops them can still start a fine-tune.
    """
    from mmpt.models.momentum import MomentumTeacher
    from mmpt.objectives.queue import FeatureQueue

    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, (MomentumTeacher, FeatureQueue)))
    return {k for k in model.state_dict() if prefixes and k.startswith(prefixes)}


def build_saved_model(saved: SavedModel) -> nn.Module:
    """The architecture of `saved.config`, with its weights; every key must match except training-only ones."""
    model_cfg = OmegaConf.to_container(saved.config.model, resolve=True)
    return load_saved_weights(build_model(model_config(model_cfg)), saved)


def load_saved_weights(model: nn.Module, saved: SavedModel) -> nn.Module:
    """`saved`'s weights into `model` (built from its config, maybe with overrides); every key must match
    except training-only ones, which an export leaves out."""
    missing, unexpected = model.load_state_dict(saved.state_dict, strict=False)
    missing = sorted(set(missing) - training_only_keys(model))
    if missing or unexpected:
        raise ConfigError(f"weights in {saved.source} do not fit the model its {CONFIG_FILE} describes "
                         f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})")
    return model


def unique_parameter_count(model: nn.Module) -> int:
    """Parameters counted once (tied weights once), teachers excluded."""
    skip = training_only_keys(model)
    return sum(p.numel() for name, p in model.named_parameters() if name not in skip)


def model_name(config: Any) -> str:
    """`arch/preset` of a saved config (e.g. clip/tiny)."""
    arch = OmegaConf.select(config, "model.arch", default="?")
    preset = OmegaConf.select(config, "model.preset", default=None)
    return f"{arch}/{preset or 'custom'}"
