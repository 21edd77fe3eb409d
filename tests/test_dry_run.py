"""`trainer.dry_run=true`: ZeRO model-state arithmetic by hand, node detection, and the real CLI on a
"login node" (one process) checking the config against the job's world without training."""
from __future__ import annotations

import json
import subprocess

import pytest

from mmpt.engine.dry_run import GIB, model_state_bytes, node_count
from tests.test_train_e2e import BIN


@pytest.mark.parametrize("precision, stage, world, want", [
    ("fp32", 0, 4, (4 * 1200, 4 * 1000, 8 * 1000)),
    ("fp32", 1, 4, (4 * 1200, 4 * 1000, 8 * 1000 / 4)),
    ("bf16", 2, 4, (2 * 1200, 2 * 1000 / 4, 12 * 1000 / 4)),
    ("bf16", 3, 8, (2 * 1200 / 8, 2 * 1000 / 8, 12 * 1000 / 8)),
])
def test_model_state_bytes_follow_the_zero_paper(precision, stage, world, want):
    got = model_state_bytes(trainable=1000, frozen=200, precision=precision, zero_stage=stage, world=world)
    assert (got.params, got.grads, got.optimizer) == pytest.approx(want)
    assert got.total == pytest.approx(sum(want))


def test_node_count_prefers_slurm_then_torchrun():
    assert node_count({"SLURM_JOB_NUM_NODES": "4", "GROUP_WORLD_SIZE": "2"}, 32) == 4
    assert node_count({"GROUP_WORLD_SIZE": "2"}, 16) == 2
    assert node_count({}, 16) == 1
    assert node_count({"SLURM_NNODES": "8"}, 4) == 4  # never more nodes than ranks


def _dry_run(demo_env, tmp_path, *overrides, nodes="2"):
    env = {**demo_env, "SLURM_JOB_NUM_NODES": nodes}
    return subprocess.run([str(BIN / "mmpt-train"), "experiment=albef_tiny", "trainer.dry_run=true",
                           f"hydra.run.dir={tmp_path / 'run'}", *overrides], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow  # a CLI subprocess
def test_cli_dry_run_reports_the_job_world_and_trains_nothing(demo_env, tmp_path):
    # SLURM_JOB_NUM_NODES=1 is this shell's (login node) allocation: the planned job's trainer.expected_nodes wins
    proc = _dry_run(demo_env, tmp_path, "trainer.expected_world_size=16", "trainer.expected_nodes=2",
                    "trainer.max_steps=300", "trainer.precision=bf16", "model.momentum.enabled=true", nodes="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.split("dry_run: ", 1)[1].splitlines()[0])
    assert (report["nodes"], report["ranks"], report["ranks_per_node"]) == (2, 16, 8)
    assert (report["micro_batch_per_rank"], report["global_batch"], report["samples"]) == (64, 1024, 300 * 1024)
    assert report["zero_stage"] == 2 and report["model"] == "albef"
    # ALBEF's momentum teacher is the frozen part: a copy of the image/text encoders and projections
    assert 0 < report["params_frozen"] < report["params_trainable"]
    assert report["params_momentum_teacher"] == report["params_frozen"]
    assert f"{report['params_frozen']:,} frozen (of which {report['params_frozen']:,} momentum teacher" in proc.stdout
    state = model_state_bytes(report["params_trainable"], report["params_frozen"], "bf16", 2, 16)
    assert report["model_state_gib_per_rank"]["total"] == pytest.approx(state.total / GIB, abs=1e-3)
    assert "2 node(s) x 8 rank(s) = 16 ranks" in proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow  # a CLI subprocess
def test_cli_dry_run_checks_the_config_against_the_expected_world(demo_env, tmp_path):
    # 3 ranks x 64 = 192 does not divide ALBEF's queue of 1024: caught on the login node, before sbatch
    proc = _dry_run(demo_env, tmp_path, "trainer.expected_world_size=3", "model.momentum.enabled=true")
    assert proc.returncode == 2 and "queue size 1024 must be a positive multiple of the global batch 192" in proc.stderr
    assert "Traceback" not in proc.stderr
