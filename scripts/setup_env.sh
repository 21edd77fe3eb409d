#!/usr/bin/env bash
# Create or update .venv with mmpt (and extras given as $1, e.g. "dev"). Sourced by quickstart.sh and test.sh.
# Idempotent: reinstalls only when pyproject.toml changed. Caches DeepSpeed's JIT-built comm op in the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
VENV="${MMPT_VENV:-$ROOT/.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

quiet_pip() {  # pip, minus the noise about absent local mirror folders; keeps pip's exit code
  local log rc=0
  log="$(mktemp)"
  pip "$@" >"$log" 2>&1 || rc=$?
  grep -v -E "^(WARNING: Location|  )" "$log" || true
  rm -f "$log"
  return "$rc"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# DeepSpeed's JIT-built ops are cached per venv: the default `import mmpt` sets (mmpt/torch_extensions.py)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VIRTUAL_ENV/torch_extensions}"

# One stamp per extra; an install with the dev extra also satisfies a plain install.
hash="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)"
stamp="$VENV/.mmpt-install-stamp-${EXTRAS:-base}"
want="$hash"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] && \
   { [ -n "$EXTRAS" ] || [ "$(cat "$VENV/.mmpt-install-stamp-dev" 2>/dev/null)" != "$want" ]; }; then
  echo "[setup] installing mmpt${EXTRAS:+[$EXTRAS]} into $VENV"
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      quiet_pip install -q "torch>=2.5,<2.15"
    else
      # CPU machine: the local CPU wheel of torch 2.13 (a plain 'torch' would pull a multi-GB CUDA build).
      quiet_pip install -q "torch==2.13.0"
    fi
  fi
  quiet_pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  python -c "import mmpt, deepspeed, webdataset, hydra, wandb" 2>/dev/null || { echo "[setup] install failed"; exit 1; }
  echo "$want" > "$stamp"
fi

if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # DeepSpeed's CPU accelerator JIT-builds a shared-memory comm op on first use (~1-2 min); build it once
  # here, cached in $TORCH_EXTENSIONS_DIR, so training runs and tests do not race to build it.
  python - <<'PY' >/dev/null 2>&1 || echo "[setup] warning: could not pre-build DeepSpeed's CPU comm op"
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load()
PY
fi
