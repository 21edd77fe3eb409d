"""Where `mmpt-train` and `mmpt-sweep` find configs: the shipped mmpt/conf/ (package data, so an installed mmpt
works from any directory) and, ahead of it, the user's folder named by MMPT_CONF_DIR (same layout:
`experiment/my.yaml`, `data/mydata.yaml`, `model/clip/mine.yaml`, `sweep/my_sweep.yaml`).

The user folder enters Hydra's config search path through a SearchPathPlugin registered here, so hydra.main
(mmpt-train) and the compose API (mmpt-sweep check, tests) see the same groups. Light on purpose: hydra only,
no torch, so `mmpt-sweep` usage errors stay fast."""
from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # shipped inside the package (pip install / wheel)
ENV_VAR = "MMPT_CONF_DIR"
PROVIDER = "mmpt (MMPT_CONF_DIR)"


def user_conf_dir() -> Path | None:
    """The MMPT_CONF_DIR folder, or None when unset; a set but missing folder is a user error."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{ENV_VAR}={raw}: no such directory; create it with your config groups (e.g. {raw}/experiment/my.yaml, "
            f"{raw}/data/mydata.yaml) or unset {ENV_VAR}")
    return path


def conf_dirs() -> list[Path]:
    """Config folders in search order: MMPT_CONF_DIR (when set and present) first, then the shipped one."""
    try:
        user = user_conf_dir()
    except FileNotFoundError:
        user = None
    return [user, CONF_DIR] if user is not None and user != CONF_DIR else [CONF_DIR]


def describe_conf_dirs(group: str) -> str:
    """Where the options of `group` came from, and where a user's own would go."""
    user = conf_dirs()[:-1]
    if user:
        return f"from {ENV_VAR}={user[0]} and {CONF_DIR}"
    return f"from {CONF_DIR}; add your own as $MMPT_CONF_DIR/{group}/NAME.yaml"


def group_options(group: str) -> list[str]:
    """Every option of a config group (`model` -> clip/tiny, albef/base, ...) found in the config folders."""
    options: set[str] = set()
    for root in conf_dirs():
        folder = root / group
        if folder.is_dir():
            options.update(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    return sorted(options)


def find_group(config_path: str) -> tuple[str, str] | None:
    """`model/clip/huge` -> (`model`, `clip/huge`): the shortest leading folder that is a config group
    (Hydra's own groups are two deep: `hydra/launcher/slurm` -> (`hydra/launcher`, `slurm`))."""
    parts = config_path.strip("/").split("/")
    first = 2 if parts[0] == "hydra" else 1
    for cut in range(first, len(parts)):
        group = "/".join(parts[:cut])
        if any((root / group).is_dir() for root in conf_dirs()) or parts[0] == "hydra":
            return group, "/".join(parts[cut:])
    return None


def find_sweep_spec(name: str) -> Path | None:
    """A shipped or MMPT_CONF_DIR sweep spec by name (`albef_lr` or `albef_lr.yaml`), None when there is none."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if "/" in stem or not stem:
        return None
    for root in conf_dirs():
        path = root / "sweep" / f"{stem}.yaml"
        if path.is_file():
            return path
    return None


def _is_mmpt_conf(path: str) -> bool:
    local = path.removeprefix("file://")
    return os.path.isdir(local) and Path(local).resolve() == CONF_DIR


class UserConfSearchPath(SearchPathPlugin):
    """Puts MMPT_CONF_DIR ahead of mmpt/conf/ whenever mmpt/conf/ is Hydra's primary config folder."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(e.provider == "main" and _is_mmpt_conf(e.path) for e in search_path.get_path()):
            return  # another Hydra app in this process: leave it alone
        user = conf_dirs()[:-1]
        if user:
            search_path.prepend(PROVIDER, f"file://{user[0]}", anchor=SearchPathQuery(provider="main"))


def register_search_path_plugin() -> None:
    """Idempotent; Hydra's plugin registry is a per-process singleton."""
    plugins = Plugins.instance()
    if UserConfSearchPath not in plugins.discover(SearchPathPlugin):
        plugins.register(UserConfSearchPath)
