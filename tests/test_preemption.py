"""Preemption: signal parsing, flag-only handlers that chain to a previous handler (submitit), and a real
2-process run where ONE rank gets SIGUSR1: both stop at the same step with a checkpoint, exit 0, and the
same command resumes to exactly max_steps with one W&B run id."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mmpt.engine.preemption import PreemptionWatch, signal_number
from mmpt.engine.wandb_offline import find_offline_runs, read_offline_run
from tests.test_train_e2e import BIN, descendants, metrics, torchrun


@pytest.mark.parametrize("name, number", [("USR1", signal.SIGUSR1), ("sigterm", signal.SIGTERM), ("12", signal.SIGUSR2)])
def test_signal_names(name, number):
    assert signal_number(name) == number


def test_unknown_signal_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown signal 'USR3'"):
        signal_number("USR3")


def test_watch_sets_flag_restores_and_chains_previous_handler():
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR1, lambda n, _f: seen.append(n))  # e.g. submitit's requeue handler
    try:
        watch = PreemptionWatch(["USR1"], torch.device("cpu"))
        assert watch.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert watch.agreed() == signal.SIGUSR1 and seen == []  # only the flag: nothing else ran yet
        watch.restore()
        watch.chain_previous(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)  # the old handler is back in place
        time.sleep(0.05)
        assert seen == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_bad_signal_in_config_exits_with_one_line(demo_env, tmp_path):
    proc = subprocess.run([str(BIN / "mmpt-train"), "experiment=clip_tiny", "trainer.preempt_signals=[USR1,HUPP]",
                           f"hydra.run.dir={tmp_path}"], env=demo_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "trainer.preempt_signals: unknown signal 'HUPP'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _train_pids(launcher_pid: int) -> list[int]:
    """The mmpt-train rank processes: torchrun's direct children (their data-loader workers are grandchildren)."""
    out = []
    for pid in descendants(launcher_pid):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == launcher_pid:
            out.append(pid)
    return out


@pytest.mark.slow
def test_usr1_to_one_rank_checkpoints_both_and_resume_finishes(demo_env, tmp_path):
    run_dir, max_steps = tmp_path / "run", 40
    cmd = torchrun(run_dir, [f"trainer.max_steps={max_steps}", "trainer.save_every=1000", "deepspeed=zero2",
                             "data.num_workers=1", "eval.at_end=false"])
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=demo_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while not (run_dir / "metrics.jsonl").exists() or not metrics(run_dir):  # first log line: step 5
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no progress in time"
            time.sleep(0.05)
        workers = _train_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGUSR1)  # one rank only: the ranks must still agree on the step
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    marker = json.loads((run_dir / "preempted.json").read_text())
    stopped = marker["step"]
    assert marker["signal"] == "SIGUSR1" and 5 <= stopped < max_steps
    assert marker["checkpoint"].endswith(f"step_{stopped:08d}")
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / "complete").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted_by"] == "SIGUSR1" and summary["step"] == stopped
    assert "preempted by SIGUSR1" in log.read_text()
    first_ids = {read_offline_run(p).run_id for p in find_offline_runs(run_dir)}

    again = subprocess.run(cmd, env=demo_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"at step {stopped}" in again.stdout + again.stderr  # resumed from the preemption checkpoint
    steps = [r["step"] for r in metrics(run_dir) if "train/loss" in r]
    assert steps[-1] == max_steps and stopped in steps  # the partial interval was logged before stopping
    assert steps == sorted(set(steps)), steps  # no step logged twice: the count continued
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == max_steps and summary["preempted_by"] is None
    assert {read_offline_run(p).run_id for p in find_offline_runs(run_dir)} == first_ids == {summary["wandb_run_id"]}
