"""slurm/pretrain.sbatch on a real local SLURM cluster (scripts/local_slurm.sh, fixture `slurm_cluster`):
a 2-task job trains to max_steps (checkpoint + W&B offline run), a preempted job (SIGUSR1) checkpoints,
requeues itself and finishes with exactly max_steps and one W&B run id, and a job spanning 2 SLURM nodes
(one task each) trains. Tiny CLIP on 32-px synthetic shards, so each job takes seconds when the machine is idle.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmpt.engine.checkpoint import complete_checkpoints
from mmpt.tools.wandb_offline import find_offline_runs, history_of_run_id, read_offline_run
from tests.slurm_cluster import ROOT, SlurmCluster, slurm_cluster, tail  # noqa: F401,F811  (the fixture)

SBATCH = ROOT / "slurm" / "pretrain.sbatch"
BIN = Path(sys.executable).parent
TINY = ["experiment=clip_tiny", "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=32",
        "scheduler.warmup_steps=5"]
JOB_TIMEOUT = 600  # seconds; a job takes ~15-40 s on an idle 2-core machine
TERMINAL_NOT_REQUEUED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def job_env(demo_env: dict[str, str], **extra: str) -> dict[str, str]:
    """The submit-time environment: this venv active (the script runs the mmpt-train it finds), offline W&B."""
    env = {k: v for k, v in demo_env.items() if not k.startswith("SLURM_")}
    env.update(VIRTUAL_ENV=str(BIN.parent), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    env.pop("MMPT_VENV", None)
    return env


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if "train/loss" in r]


def job_log(tmp_path: Path, job_id: str) -> Path:
    return tmp_path / f"mmpt-pretrain-{job_id}.log"  # the script's default --output=%x-%j.log, in the submit dir


def check_finished_run(run_dir: Path, max_steps: int, log: Path, wandb: bool = True, ranks: int = 2) -> dict:
    """summary, final checkpoint, metrics and the W&B offline run of a finished run; returns the summary."""
    summary_path = run_dir / "summary.json"
    assert summary_path.exists(), f"no {summary_path}{tail(log)}"
    summary = json.loads(summary_path.read_text())
    assert summary["step"] == max_steps, summary
    kept = complete_checkpoints(run_dir / "checkpoints")
    assert kept and kept[-1].name == f"step_{max_steps:08d}", kept
    assert {f"rng_rank{r:05d}.pt" for r in range(ranks)} <= {p.name for p in kept[-1].iterdir()}  # every rank saved
    steps = train_steps(run_dir)
    assert steps and steps[-1] == max_steps and steps == sorted(set(steps)), steps
    if not wandb:
        return summary
    runs = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert runs and {r.run_id for r in runs} == {summary["wandb_run_id"]}, [r.run_id for r in runs]
    assert runs[-1].finished and runs[-1].config["trainer"]["max_steps"] == max_steps
    history = [row["_step"] for row in history_of_run_id(run_dir, summary["wandb_run_id"]) if "train/loss" in row]
    assert history == steps, (history, steps)  # W&B logged exactly the steps of metrics.jsonl, once each
    return summary


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_trains_to_max_steps(slurm_cluster: SlurmCluster, demo_env, tmp_path):
    max_steps = 30
    job = slurm_cluster.sbatch(SBATCH, [*TINY, f"trainer.max_steps={max_steps}", "trainer.save_every=10",
                                        "trainer.log_every=5", "logger=wandb"],
                               sbatch_args=["--ntasks-per-node=2"], cwd=tmp_path, env=job_env(demo_env))
    log = job_log(tmp_path, job)
    state = slurm_cluster.wait(job, timeout=JOB_TIMEOUT, log=log)
    assert state == "COMPLETED", f"job {job}: {state}{tail(log)}"
    text = log.read_text()
    assert "2 ranks (slurm)" in text, tail(log)  # srun started 2 tasks; mmpt mapped SLURM_* to the ranks
    run_dir = tmp_path / "runs" / f"slurm-{job}"  # the default run dir: runs/slurm-<jobid> in the submit dir
    check_finished_run(run_dir, max_steps, log)
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000020", "step_00000030"]
    assert train_steps(run_dir) == list(range(5, max_steps + 1, 5))
    steps = {r["JobID"]: r for r in slurm_cluster.final_accounting(job)}
    assert steps[f"{job}.0"]["NTasks"] == "2" and steps[f"{job}.0"]["State"] == "COMPLETED", steps


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, demo_env, tmp_path):
    max_steps = 80  # the signal comes after step 1 and lands within a few steps even on a fast machine
    args = [*TINY, f"trainer.max_steps={max_steps}", "trainer.log_every=1", "logger=wandb",
            "trainer.save_every=1000"]  # no periodic checkpoint: the resume must use the preemption's
    job = slurm_cluster.sbatch(SBATCH, args, sbatch_args=["--ntasks-per-node=2"], cwd=tmp_path,
                               env=job_env(demo_env))
    log = job_log(tmp_path, job)
    run_dir = tmp_path / "runs" / f"slurm-{job}"

    deadline = time.monotonic() + JOB_TIMEOUT
    while not train_steps(run_dir):  # training is under way (first record at step 1)
        state = slurm_cluster.state(job)
        assert state in {"PENDING", "RUNNING", "CONFIGURING"}, f"job {job} {state} before training{tail(log)}"
        assert time.monotonic() < deadline, f"job {job}: no training step in time{tail(log)}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@120 does at the limit

    # the batch shell forwards USR1 to the ranks, they checkpoint and exit 0, the script requeues the job
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        info = slurm_cluster.job(job)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1:
            break
        assert info.get("JobState") not in TERMINAL_NOT_REQUEUED, f"job {job}: {info.get('JobState')}{tail(log)}"
        assert time.monotonic() < deadline, f"job {job} was not requeued: {info.get('JobState')}{tail(log)}"
        time.sleep(0.2)
    marker = json.loads((run_dir / "preempted.json").read_text())
    preempted_at = marker["step"]
    assert marker["signal"] == "SIGUSR1" and 0 < preempted_at < max_steps, marker
    assert Path(marker["checkpoint"]).name == f"step_{preempted_at:08d}", marker
    first_ids = {read_offline_run(p).run_id for p in find_offline_runs(run_dir)}
    assert len(first_ids) == 1, first_ids
    assert "requeueing job" in log.read_text(), tail(log)

    slurm_cluster.release_requeued(job)  # skip most of the ~120 s requeue hold
    state = slurm_cluster.wait(job, timeout=JOB_TIMEOUT, log=log)
    assert state == "COMPLETED", f"job {job}: {state}{tail(log)}"

    text = log.read_text()  # --open-mode=append: both runs of the job in one log
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text, tail(log)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", text)
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)) == preempted_at, tail(log)
    summary = check_finished_run(run_dir, max_steps, log)  # metrics.jsonl steps == W&B history steps
    assert train_steps(run_dir) == list(range(1, max_steps + 1))  # continuous across the requeue, each once
    assert {read_offline_run(p).run_id for p in find_offline_runs(run_dir)} == first_ids == {summary["wandb_run_id"]}
    segments = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert len(segments) == 2 and all(seg.finished for seg in segments)  # one W&B run, two closed segments
    runs = [r["State"].split()[0] for r in slurm_cluster.final_accounting(job, "JobID,State", duplicates=True)
            if r["JobID"] == job]
    assert runs[:1] == ["REQUEUED"] and runs[-1] == "COMPLETED", runs


@pytest.mark.slurm
@pytest.mark.slow
def test_job_spans_two_nodes_one_task_each(slurm_cluster: SlurmCluster, demo_env, tmp_path):
    max_steps = 20
    run_dir = tmp_path / "run"
    env = job_env(demo_env, MMPT_VENV=str(BIN.parent))  # also: the env named by MMPT_VENV
    job = slurm_cluster.sbatch(SBATCH, [*TINY, f"trainer.max_steps={max_steps}", "trainer.save_every=10",
                                        "trainer.log_every=5", "logger=none", f"hydra.run.dir={run_dir}"],
                               sbatch_args=["--nodes=2", "--ntasks-per-node=1"], cwd=tmp_path, env=env)
    log = job_log(tmp_path, job)
    state = slurm_cluster.wait(job, timeout=JOB_TIMEOUT, log=log)
    assert state == "COMPLETED", f"job {job}: {state}{tail(log)}"
    assert "2 node(s), 2 rank(s)" in log.read_text() and "2 ranks (slurm)" in log.read_text(), tail(log)
    check_finished_run(run_dir, max_steps, log, wandb=False)
    step = {r["JobID"]: r for r in slurm_cluster.final_accounting(job)}[f"{job}.0"]
    assert (step["NNodes"], step["NTasks"], step["NodeList"]) == ("2", "2", "node[1-2]"), step


@pytest.mark.slurm
@pytest.mark.slow
def test_one_task_job_and_a_job_with_a_config_error(slurm_cluster: SlurmCluster, demo_env, tmp_path):
    """The #SBATCH defaults (1 node, 1 task): one plain process; a user error fails the job with mmpt's
    message and exit code 2, and nothing requeues it. Both jobs run side by side."""
    env = job_env(demo_env)
    good = slurm_cluster.sbatch(SBATCH, [*TINY, "trainer.max_steps=5", "trainer.log_every=5", "logger=none"],
                                cwd=tmp_path, env=env)
    bad = slurm_cluster.sbatch(SBATCH, [*TINY, "trainer.precision=fp13"], cwd=tmp_path, env=env)
    good_log, bad_log = job_log(tmp_path, good), job_log(tmp_path, bad)
    assert slurm_cluster.wait(good, timeout=JOB_TIMEOUT, log=good_log) == "COMPLETED", tail(good_log)
    assert "1 ranks (single)" in good_log.read_text(), tail(good_log)
    check_finished_run(tmp_path / "runs" / f"slurm-{good}", 5, good_log, wandb=False, ranks=1)
    assert slurm_cluster.wait(bad, timeout=JOB_TIMEOUT, log=bad_log) == "FAILED", tail(bad_log)
    assert "error: trainer.precision='fp13' is not valid" in bad_log.read_text(), tail(bad_log)
    rows = slurm_cluster.final_accounting(bad, "JobID,State,ExitCode", duplicates=True)
    assert [(r["State"], r["ExitCode"]) for r in rows if r["JobID"] == bad] == [("FAILED", "2:0")], rows


# ---- the script's own checks: no cluster needed -----------------------------------------------------------

def run_sbatch_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=60)


def test_script_outside_slurm_says_how_to_submit():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = run_sbatch_script(env)
    assert proc.returncode == 2 and "submit with 'sbatch slurm/pretrain.sbatch" in proc.stdout, proc.stdout


def test_script_refuses_tasks_per_node_other_than_gpus_per_node():
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = run_sbatch_script(env, "experiment=clip_tiny")
    assert proc.returncode == 2 and "--ntasks-per-node=8 --gpus-per-node=8" in proc.stdout, proc.stdout


def test_script_names_a_missing_venv():
    env = {**os.environ, "SLURM_JOB_ID": "7", "MMPT_VENV": "/nonexistent/venv"}
    proc = run_sbatch_script(env)
    assert proc.returncode == 2 and "MMPT_VENV=/nonexistent/venv has no bin/mmpt-train" in proc.stdout, proc.stdout
