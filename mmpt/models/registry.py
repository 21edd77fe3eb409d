"""Registry of architectures: `arch` name -> (structured config dataclass, builder).

Configs are validated against the dataclass (unknown keys, wrong types) before anything is built.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, is_dataclass
from typing import Any

from omegaconf import OmegaConf
from torch import nn


@dataclass(frozen=True)
class ArchEntry:
    config_cls: type
    builder: Callable[[Any], nn.Module]


_REGISTRY: dict[str, ArchEntry] = {}


def register_arch(name: str, config_cls: type) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator for a builder `fn(config_instance) -> nn.Module`."""

    def wrap(fn: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        _REGISTRY[name] = ArchEntry(config_cls, fn)
        return fn

    return wrap


def _load_builtin_archs() -> None:
    from mmpt.models import clip  # noqa: F401  (registers itself)
    from mmpt.models import albef  # noqa: F401
    from mmpt.models import coca  # noqa: F401
    from mmpt.models import vlmo  # noqa: F401
    from mmpt.models import beit3  # noqa: F401


def arch_names() -> list[str]:
    _load_builtin_archs()
    return sorted(_REGISTRY)


def arch_entry(name: str) -> ArchEntry:
    _load_builtin_archs()
    if name not in _REGISTRY:
        raise KeyError(f"model.arch={name!r} is not a known architecture; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def model_config(model_cfg: Any) -> Any:
    """Merge a (dict / DictConfig) model config onto its arch's dataclass and return the typed object."""
    arch = model_cfg["arch"]
    schema = OmegaConf.structured(arch_entry(arch).config_cls)
    merged = OmegaConf.merge(schema, model_cfg)
    return OmegaConf.to_object(merged)


def build_model(model_cfg: Any) -> nn.Module:
    """Accepts the arch's typed config, or a dict/DictConfig that is validated into one first."""
    typed = model_cfg if is_dataclass(model_cfg) else model_config(model_cfg)
    return arch_entry(typed.arch).builder(typed)
