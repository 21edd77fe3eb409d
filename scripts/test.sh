#!/usr/bin/env bash
# Create/update .venv with the dev extra and run the whole test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh
. "$ROOT/scripts/setup_env.sh" dev
export WANDB_MODE=offline WANDB_SILENT=true WANDB_DISABLE_GIT=true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# tests/test_slurm.py (marker `slurm`) submits real jobs to a local SLURM: its session fixture
# (tests/slurm_cluster.py) starts scripts/local_slurm.sh when no cluster runs (as root; the first time it
# apt-installs slurm-wlm, munge, MariaDB), stops it afterwards, and skips those tests with the reason where
# the machine cannot host it (not root, no apt-get, no Debian packages). `-m "not slurm"` leaves them out.
# Variables of an enclosing SLURM job would point the tests' jobs at the wrong cluster: drop them.
unset SLURM_CONF SLURM_JOB_ID SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NODEID SLURM_JOB_NODELIST
exec python -m pytest -q "$@"
