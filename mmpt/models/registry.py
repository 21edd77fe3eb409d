"""Registry of architectures: `arch` name -> (structured config dataclass, builder, named presets).

A config is composed as dataclass defaults <- the named preset (`model.preset`, Python, one source per
preset) <- the YAML / overrides, and validated (unknown keys, wrong types, `problems()`) before anything is
built. Adding an architecture = one config module, one model module, `register_arch`, one line in
`BUILTIN_MODULES`, and mmpt/conf/model/<name>/*.yaml naming its presets.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from mmpt.modules.block import init_std_scope
from mmpt.modules.checkpointing import set_activation_checkpointing

BUILTIN_MODULES = ("clip", "albef", "coca", "vlmo", "beit3")


@dataclass(frozen=True)
class ArchEntry:
    config_cls: type
    builder: Callable[[Any], nn.Module]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_REGISTRY: dict[str, ArchEntry] = {}


def register_arch(
    name: str, config_cls: type, presets: Mapping[str, Mapping[str, Any]] | None = None
) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator for a builder `fn(config_instance) -> nn.Module`; presets: name -> nested overrides."""

    if getattr(config_cls, "arch_name", name) != name:
        raise ValueError(f"{config_cls.__name__}.arch_name={config_cls.arch_name!r} but it registers as {name!r}")

    def wrap(fn: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        _REGISTRY[name] = ArchEntry(config_cls, fn, dict(presets or {}))
        return fn

    return wrap


def _load_builtin_archs() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(f"mmpt.models.{module}")


def arch_names() -> list[str]:
    _load_builtin_archs()
    return sorted(_REGISTRY)


def arch_entry(name: str) -> ArchEntry:
    _load_builtin_archs()
    if name not in _REGISTRY:
        raise KeyError(f"model.arch={name!r} is not a known architecture; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def preset_overrides(arch: str, preset: str | None) -> Mapping[str, Any]:
    """The nested overrides of a named preset ({} for none); an unknown name lists the known ones."""
    if preset is None:
        return {}
    presets = arch_entry(arch).presets
    if preset not in presets:
        raise KeyError(f"model.preset={preset!r} is not a preset of {arch}; choose one of {sorted(presets)}")
    return presets[preset]


def model_config(model_cfg: Any) -> Any:
    """Merge a (dict / DictConfig) model config onto its arch's dataclass and preset; the typed object."""
    arch = model_cfg["arch"]
    schema = OmegaConf.structured(arch_entry(arch).config_cls)
    preset = model_cfg.get("preset") if hasattr(model_cfg, "get") else None
    merged = OmegaConf.merge(schema, dict(preset_overrides(arch, preset)), model_cfg)
    return OmegaConf.to_object(merged)


def preset_config(arch: str, preset: str, **overrides: Any) -> Any:
    """The typed config of a named preset, e.g. `preset_config("albef", "base")` (param counts, tests)."""
    return model_config({"arch": arch, "preset": preset, **overrides})


def build_model(model_cfg: Any) -> nn.Module:
    """Accepts the arch's typed config, or a dict/DictConfig that is validated into one first; initialises every
    module with the config's `init_std`; applies its `activation_checkpointing` to every block stack."""
    typed = model_cfg if is_dataclass(model_cfg) else model_config(model_cfg)
    with init_std_scope(typed.init_std):
        model = arch_entry(typed.arch).builder(typed)
    set_activation_checkpointing(model, typed.activation_checkpointing)  # every tower's block stacks, one place
    return model


def register_model_presets() -> None:
    """Put every arch's presets into Hydra's ConfigStore as typed nodes `model_preset/<arch>_<preset>`, so a
    mmpt/conf/model YAML names its preset (`defaults: [/model_preset@_here_: albef_tiny, _self_]`), states only what
    differs, and every key of the schema can be overridden on the command line without `+`."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for arch in arch_names():
        entry = arch_entry(arch)
        for preset, overrides in entry.presets.items():
            node = OmegaConf.merge(OmegaConf.structured(entry.config_cls), dict(overrides), {"arch": arch, "preset": preset})
            store.store(group="model_preset", name=f"{arch}_{preset}", node=node)
