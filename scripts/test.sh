#!/usr/bin/env bash
# Create/update .venv with the dev extra and run the whole test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh
. "$ROOT/scripts/setup_env.sh" dev
export WANDB_MODE=offline WANDB_SILENT=true WANDB_DISABLE_GIT=true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q "$@"
