"""Where DeepSpeed's JIT-built ops (the CPU shared-memory comm op, 75-140 s to build here) are cached: inside the
active virtual environment, so each venv or clone builds it once and keeps it, instead of rebuilding it on every
start or sharing one folder between venvs with different torch/DeepSpeed versions. Runs at `import mmpt`,
before any mmpt code imports DeepSpeed; a TORCH_EXTENSIONS_DIR the user set always wins."""
from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

ENV_VAR = "TORCH_EXTENSIONS_DIR"
FOLDER = "torch_extensions"


def default_torch_extensions_dir(environ: MutableMapping[str, str] = os.environ, prefix: str = sys.prefix,
                                 base_prefix: str = sys.base_prefix) -> str | None:
    """Set TORCH_EXTENSIONS_DIR to `<venv>/torch_extensions` when it is unset and Python runs in a writable venv;
    returns the value in effect (None: torch's own default, ~/.cache/torch_extensions/<py>_<cuda>)."""
    if environ.get(ENV_VAR):
        return environ[ENV_VAR]
    if Path(prefix).resolve() == Path(base_prefix).resolve() or not os.access(prefix, os.W_OK):
        return None  # no venv (or a read-only one): keep torch's default
    environ[ENV_VAR] = str(Path(prefix) / FOLDER)
    return environ[ENV_VAR]
