"""Which sweep a run belongs to, for its W&B identity: a Hydra multirun (`mmpt-train -m ...`, any launcher)
or a W&B sweep agent (env WANDB_SWEEP_ID).

Runs of one sweep share a W&B group: `logger.group` when set, else `sweep-<name>` (the sweep dir's last
component for a Hydra multirun, the sweep id under a W&B agent). A run's name carries the overrides that
vary across the sweep (`job3 optimizer.lr=0.0003`). The W&B config gets the job's override list under
`overrides` and, in a sweep, `sweep: {id, kind, dir, job_num, swept}` besides the resolved config.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpt.engine.config import LoggerConfig

MAX_NAME_CHARS = 128  # W&B display names are meant to be short


@dataclass(frozen=True)
class SweepInfo:
    kind: str = ""  # "" (a single run) | "hydra" (multirun) | "wandb" (W&B sweep agent)
    sweep_id: str = ""  # stable for every job of the sweep
    sweep_dir: str | None = None
    job_num: int | None = None
    overrides: list[str] = field(default_factory=list)  # the job's own Hydra overrides (task overrides)
    swept: list[str] = field(default_factory=list)  # those of `overrides` that vary across the sweep


@dataclass(frozen=True)
class WandbIdentity:
    group: str | None
    name: str | None
    tags: list[str]
    config: dict[str, Any]  # added to the W&B config (`overrides`, `sweep`)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys with sweep syntax (a,b / range() / choice()) in the multirun's original overrides, which
    Hydra's basic sweeper saves to <sweep dir>/multirun.yaml; None when that cannot be read."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        saved = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
        task = list(saved["hydra"]["overrides"]["task"])
        parsed = OverridesParser.create().parse_overrides(task)
    except Exception:  # noqa: BLE001 - best effort: fall back to every override
        return None
    return {o.key_or_group.lstrip("+~") for o in parsed if o.is_sweep_override()}


def _agent_params(environ: Mapping[str, str]) -> set[str] | None:
    """Parameter names of a W&B agent's run (its WANDB_SWEEP_PARAM_PATH file), when readable."""
    path = environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path:
        return None
    try:
        text = Path(path).read_text()
        params = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
        return {str(k).lstrip("+~") for k in params if not str(k).startswith("_")}
    except Exception:  # noqa: BLE001
        return None


def current_sweep_info(environ: Mapping[str, str] | None = None) -> SweepInfo:
    """The running Hydra job's sweep context (a plain SweepInfo outside Hydra, e.g. in unit tests)."""
    env = os.environ if environ is None else environ
    overrides: list[str] = []
    hc = None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            overrides = [str(o) for o in hc.overrides.task]
    except Exception:  # noqa: BLE001 - no Hydra context: a single run
        hc = None
    if env.get("WANDB_SWEEP_ID"):
        keys = _agent_params(env)
        swept = [o for o in overrides if keys is None or _key(o) in keys]
        return SweepInfo("wandb", env["WANDB_SWEEP_ID"], None, None, overrides, swept)
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(str(hc.sweep.dir))
        keys = _swept_keys(sweep_dir)
        swept = [o for o in overrides if keys is None or _key(o) in keys]
        num = hc.job.get("num")
        return SweepInfo("hydra", sweep_dir.name, str(sweep_dir), None if num is None else int(num), overrides, swept)
    return SweepInfo(overrides=overrides)


def wandb_identity(cfg: LoggerConfig, info: SweepInfo) -> WandbIdentity:
    """Group, name, tags and extra config of the W&B run (cfg's own values outside a sweep)."""
    extra: dict[str, Any] = {"overrides": list(info.overrides)} if info.overrides else {}
    if not info.kind:
        return WandbIdentity(cfg.group, cfg.name, list(cfg.tags), extra)
    group = cfg.group or f"sweep-{info.sweep_id}"
    prefix = cfg.name or (f"job{info.job_num}" if info.job_num is not None else "")
    name = " ".join([prefix, *info.swept]).strip() or None
    if name and len(name) > MAX_NAME_CHARS:
        name = name[: MAX_NAME_CHARS - 3] + "..."
    tags = list(cfg.tags)
    tag = f"sweep-{info.sweep_id}"[:64]  # W&B tags are at most 64 characters
    if tag not in tags:
        tags.append(tag)
    extra["sweep"] = {"id": info.sweep_id, "kind": info.kind, "dir": info.sweep_dir, "job_num": info.job_num,
                      "swept": list(info.swept)}
    return WandbIdentity(group, name, tags, extra)
