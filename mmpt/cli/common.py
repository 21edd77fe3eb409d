"""Shared CLI plumbing: where mmpt/conf/ lives, argv as Hydra wants it, and turning user errors into one line +
exit code 2."""
from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

from mmpt.cli.brace_quoting import quote_brace_override
from mmpt.cli.conf_search import CONF_DIR, register_search_path_plugin  # noqa: F401 - CONF_DIR re-exported
from mmpt.data.stall import DataStreamError
from mmpt.engine.config import ConfigError
from mmpt.models.registry import register_model_presets

register_search_path_plugin()  # MMPT_CONF_DIR's groups ahead of the shipped mmpt/conf/ (conf_search.py)
register_model_presets()  # mmpt/conf/model/*/*.yaml name their Python presets (model_preset/<arch>_<preset>)
USER_ERRORS = (ConfigError, FileNotFoundError, DataStreamError)  # DataStreamError: shards gone, data stalled


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become `error: ...` on stderr and exit 2, not a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            fail(str(exc))

    return wrapper


def strip_launcher_args(argv: list[str]) -> list[str]:
    """argv as Hydra wants it: drop the deepspeed launcher's --local_rank=N (it also sets LOCAL_RANK) and
    turn `--key=value` overrides (what a W&B sweep agent passes with ${args}) into `key=value`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return normalize_override_args(out)


# Hydra's own command-line flags (hydra/_internal/utils.py get_args_parser): never rewritten.
HYDRA_FLAGS = frozenset({
    "--help", "--hydra-help", "--version", "--cfg", "--resolve", "--package", "--run", "--multirun",
    "--shell-completion", "--config-path", "--config-name", "--config-dir", "--experimental-rerun", "--info",
})
# An override key in Hydra's grammar: optional +, ++ or ~, then a dotted key or a config group path,
# optionally @package (e.g. trainer.max_steps, +loss.weights.mlm, hydra/launcher, model@foo).
_OVERRIDE_KEY = re.compile(r"(~|\+\+|\+)?[A-Za-z_$][\w$-]*([./][\w$-]+)*(@[\w$.-]*)?")
_VALUE_ARG = re.compile(r"[^-]|-\d|-\.\d|$")  # a value, not a flag (negative numbers are values)


def normalize_override_args(argv: list[str]) -> list[str]:
    """`--key=value` -> `key=value`, `--key value` -> `key=value`, `--~key` -> `~key`; Hydra's own flags
    (`--multirun`, `--config-name X`, `--cfg job`, ...), short flags (`-m`) and anything that is not an
    override key stay as they are, so Hydra still reports them. Only exact flag names count: argparse would
    read `--experiment=x` as an abbreviation of `--experimental-rerun`, so an override key wins. Brace patterns
    in values (`data.train.urls=/d/{0..9}.tar`, the shell having stripped the quotes) come back quoted."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        if f"--{name}" in HYDRA_FLAGS or not _OVERRIDE_KEY.fullmatch(name):
            out.append(arg)
        elif eq:
            out.append(f"{name}={value}")
        elif name.startswith("~"):
            out.append(name)  # deletion: no value
        elif i < len(argv) and "=" not in argv[i] and _VALUE_ARG.match(argv[i]) and argv[i] not in HYDRA_FLAGS:
            out.append(f"{name}={argv[i]}")
            i += 1
        else:
            out.append(arg)  # a bare --flag: leave it for Hydra to reject by name
    return [quote_brace_override(a) if _is_override(a) else a for a in out]


def _is_override(arg: str) -> bool:
    key, eq, _ = arg.partition("=")
    return bool(eq) and _OVERRIDE_KEY.fullmatch(key) is not None
