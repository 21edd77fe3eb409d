"""Shared CLI plumbing: where conf/ lives, and turning user errors into one line + exit code 2."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

from mmpt.engine.config import ConfigError

CONF_DIR = Path(os.environ.get("MMPT_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
USER_ERRORS = (ConfigError, FileNotFoundError)


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
    """The deepspeed launcher appends --local_rank=N (it also sets LOCAL_RANK); Hydra must not see it."""
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
    return out
