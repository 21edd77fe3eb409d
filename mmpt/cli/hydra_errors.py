"""Hydra's override and composition errors as mmpt's one-line `error: what, where, how to fix` (exit 2).

Hydra prints these itself (several lines, a search path dump, sometimes a traceback) from
`hydra._internal.utils.run_and_report`, which wraps composition, `--cfg` and the run. `hydra_errors_exit()`
wraps that function for the duration of one CLI call: a composition error we can explain becomes `fail(...)`
(SystemExit passes through Hydra's `except Exception`); everything else, and `--help`/`--cfg` output, is
Hydra's as before."""
from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException, SearchPathException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException, ValidationError

from mmpt.cli.conf_search import conf_dirs, describe_conf_dirs, find_group, group_options

GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"
# Launchers that live in an optional extra: the Hydra plugin module and the extra that installs it.
EXTRA_PLUGINS = {"submitit": ("hydra_plugins.hydra_submitit_launcher", "slurm")}
_LAUNCHER_EXTRA = {"slurm": "submitit", "local": "submitit", "submitit_slurm": "submitit",
                   "submitit_local": "submitit"}
_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_ALREADY_THERE = re.compile(r"An item is already at '([^']+)'")
_CANNOT_DELETE = re.compile(r"Could not delete from config\. '([^']+)' does not exist")
_MERGING_OVERRIDE = re.compile(r"Error merging override (\S+)")
_NO_PRIMARY = re.compile(r"Cannot find primary config '([^']*)'")
_AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^']+)'")
_TWICE_IN_DEFAULTS = re.compile(r"(\S+) appears more than once in the final defaults list")
# ValueError: Hydra's defaults list raises it for an override without a key (`=3`)
_HYDRA_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException, MissingMandatoryValue,
                 ValueError)


def explain(exc: BaseException, overrides: Sequence[str]) -> str | None:
    """The one-line message for a Hydra/OmegaConf composition error, or None when it is not one we know."""
    if isinstance(exc, OverrideParseException):
        return _parse_error(exc, overrides)
    if isinstance(exc, MissingConfigException):
        if (m := _NO_PRIMARY.search(str(exc))) is not None:
            return _missing_primary(m.group(1))
        return _missing_option(exc, overrides)
    if isinstance(exc, SearchPathException):
        return f"{_first_line(exc)}; --config-dir takes an existing folder of config groups"
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "?"
        return f"config key '{key}' is required but not set (???). Set it on the command line: {key}=..."
    if isinstance(exc, ValueError) and "Config group override must be" in str(exc):
        bad = next((item for item in overrides if item.startswith("=")), "?")
        return (f"cannot parse override {bad!r}: an override is key=value and this one has no key "
                f"(override grammar: {GRAMMAR_URL})")
    if not isinstance(exc, ConfigCompositionException):
        return None
    text = str(exc)
    if (m := _COULD_NOT_OVERRIDE.search(text)) is not None:
        return _unknown_key(m.group(1), exc.__cause__, overrides)
    if (m := _ALREADY_THERE.search(text)) is not None:
        key = m.group(1)
        given = _override_for(key, overrides, prefix="+")
        value = given.split("=", 1)[1] if given else "..."
        return (f"'{given or '+' + key}': {key} already exists, so it cannot be added with +; "
                f"set it with {key}={value} (or ++{key}={value} to add or set)")
    if (m := _CANNOT_DELETE.search(text)) is not None:
        return (f"cannot delete '{m.group(1)}': no such key in the config{_close_hint(m.group(1), exc.__cause__)} "
                "Check its spelling (mmpt-train --cfg job prints every key)")
    if (m := _MERGING_OVERRIDE.search(text)) is not None and isinstance(exc.__cause__, ValidationError):
        return _wrong_value(m.group(1), exc.__cause__)
    if (m := _AMBIGUOUS.search(text)) is not None:
        key, _, value = m.group(1).partition("=")
        return (f"'{m.group(1)}': a value with commas is ambiguous; write {key}=[{value}] for a list, "
                f"\"{key}='{value}'\" for one string, or add --multirun (-m) to sweep over {value}")
    if (m := _TWICE_IN_DEFAULTS.search(text)) is not None:
        return _added_twice(m.group(1), overrides)
    return None


def _missing_primary(name: str) -> str:
    """`--config-name nope`: list the primary configs (top-level YAML files) there are."""
    names = sorted({p.stem for root in conf_dirs() for p in root.glob("*.yaml")})
    return (f"--config-name {name}: no primary config '{name}'; available: {', '.join(names) or 'none'} "
            f"(in {', '.join(str(root) for root in conf_dirs())})")


def _added_twice(entry: str, overrides: Sequence[str]) -> str | None:
    """`+model=clip/tiny`: the group is already in the defaults list, so `+` adds it a second time."""
    package = entry.split("@", 1)[-1]
    for item in overrides:
        name, eq, value = item.partition("=")
        group = name.lstrip("+").split("@", 1)[0]
        if eq and name.startswith("+") and not name.startswith("++") and package in (group, group.split("/")[0]):
            return (f"'{item}': config group '{group}' is already chosen by the defaults, so + would add it twice; "
                    f"select the option with {group}={value}")
    return None


def _wrong_value(override: str, cause: ValidationError) -> str:
    """A typed node (a model piece's dataclass) refused the override's value: say which key and what type."""
    key = getattr(cause, "full_key", None) or override.split("=", 1)[0].lstrip("+~")
    reason = (str(cause.msg) if getattr(cause, "msg", None) else _first_line(cause)).splitlines()[0].rstrip(".")
    return f"config key '{key}' has a wrong type or value: {reason} (override '{override}'); give a value of that type"


def _parse_error(exc: OverrideParseException, overrides: Sequence[str]) -> str:
    bad = exc.override or _first_unparsable(overrides) or "?"
    reason = exc.message.splitlines()[0] if exc.message else "not valid override syntax"
    return (f"cannot parse override {bad!r}: {reason}. Quote a value that holds special characters "
            f"(spaces, {{}}, [], (), commas, =, :) for Hydra, inside shell quotes: \"key='a value'\" "
            f"(override grammar: {GRAMMAR_URL})")


def _first_unparsable(overrides: Sequence[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_override(item)
        except Exception:  # noqa: BLE001 - the grammar's errors have several types
            return item
    return None


def _unknown_key(key: str, cause: BaseException | None, overrides: Sequence[str]) -> str:
    given = _override_for(key, overrides)
    value = given.split("=", 1)[1] if given else "VALUE"
    return (f"unknown config key '{key}' (override '{given or key}'){_close_hint(key, cause)} "
            f"To add a new key, write +{key}={value}")


def _close_hint(key: str, cause: BaseException | None) -> str:
    """` Did you mean 'trainer.max_steps'? Valid keys here: ...` from the node the key was looked up in."""
    parent = getattr(cause, "parent_node", None) if isinstance(cause, OmegaConfBaseException) else None
    try:
        keys = [str(k) for k in parent.keys()] if parent is not None else []
    except Exception:  # noqa: BLE001 - a node that is not a mapping
        keys = []
    if not keys:
        return "."
    head, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, keys, n=2, cutoff=0.5)
    prefix = f"{head}." if head else ""
    mean = f" Did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
    shown = ", ".join(sorted(keys)[:20]) + (", ..." if len(keys) > 20 else "")
    return f".{mean} Valid keys in {head or 'the top level'}: {shown}."


def _missing_option(exc: MissingConfigException, overrides: Sequence[str]) -> str | None:
    missing = exc.missing_cfg_file or ""
    named = [item.lstrip("+~").split("=", 1) for item in overrides if "=" in item]
    chosen = [(g.split("@", 1)[0], v) for g, v in named if f"{g.split('@', 1)[0]}/{v}" == missing]
    place = chosen[0] if chosen else find_group(missing)
    if place is None:
        return None
    group, option = place
    extra = _needed_extra(group, option, str(exc), overrides)
    if extra is not None:
        return extra
    options = sorted(set(group_options(group)) | set(exc.options or []))
    given = _override_for(group, overrides) or f"{group}={option}"
    listed = ", ".join(options) if options else "none"
    return (f"{given}: no config '{option}' in group '{group}'; available: {listed} "
            f"(configs {describe_conf_dirs(group)})")


def missing_extra(exc: BaseException, overrides: Sequence[str]) -> str | None:
    """The `needs the [extra]` message when `exc` comes from a launcher whose optional extra is not installed."""
    if not isinstance(exc, MissingConfigException):
        return None
    place = find_group(exc.missing_cfg_file or "")
    return _needed_extra(*place, str(exc), overrides) if place is not None else None


def _needed_extra(group: str, option: str, text: str, overrides: Sequence[str]) -> str | None:
    """`hydra/launcher=slurm` without hydra-submitit-launcher: name the extra that installs it."""
    if group != "hydra/launcher":
        return None
    chosen = _override_for(group, overrides)
    parent = re.match(r"In 'hydra/launcher/([^']+)'", text)  # our slurm.yaml naming Hydra's submitit_slurm
    asked = chosen.split("=", 1)[1] if chosen else parent.group(1) if parent else option
    plugin = _LAUNCHER_EXTRA.get(asked) or _LAUNCHER_EXTRA.get(option)
    if plugin is None and "submitit" in text:
        plugin = "submitit"
    if plugin is None:
        return None
    module, extra = EXTRA_PLUGINS[plugin]
    if _installed(module):
        return None
    return (f"hydra/launcher={asked} needs the [{extra}] extra: pip install 'mmpt[{extra}]' "
            f"(Hydra's {plugin} launcher plugin is not installed)")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _override_for(key: str, overrides: Sequence[str], prefix: str = "") -> str | None:
    """The user's override that sets `key` (with any +/++/~ prefix), e.g. `trainer.max_stpes=5`."""
    for item in overrides:
        name = item.split("=", 1)[0]
        if name.lstrip("+~").split("@", 1)[0] == key and name.startswith(prefix):
            return item
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def hydra_errors_exit(overrides: Sequence[str], fail: Callable[[str], None]) -> Iterator[None]:
    """Within: Hydra composition errors that `explain` knows end as `fail(message)` (one line, exit 2)."""
    import hydra._internal.utils as hydra_utils

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None:  # a Hydra without this hook: its own error reports stay
        yield
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        def explained() -> Any:
            try:
                return func()
            except _HYDRA_ERRORS as exc:
                message = explain(exc, overrides)
                if message is None:
                    raise
                fail(message)

        return original(explained)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original
