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

from mmpt.engine.preemption import PreemptionWatch, signal_number
from mmpt.tools.wandb_offline import find_offline_runs, read_offline_run
from tests.dist_helpers import descendants
from tests.test_train_e2e import BIN, metrics, torchrun


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
        watch = PreemptionWatch(["USR1"])
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


@pytest.mark.slow  # a CLI subprocess
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


def _preempt_after(cmd: list[str], env: dict, run_dir: Path, logged_step: int, log: Path, sig: int) -> dict:
    """Start (or resume) the run; once metrics.jsonl has a record past `logged_step`, send `sig` to ONE rank
    only (the ranks must still agree on the step). Returns the preempted.json marker."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while not (run_dir / "metrics.jsonl").exists() or max((r["step"] for r in metrics(run_dir)), default=0) <= logged_step:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no progress in time"
            time.sleep(0.05)
        workers = _train_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), sig)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"preempted by {signal.Signals(sig).name}" in log.read_text()
    return json.loads((run_dir / "preempted.json").read_text())


@pytest.mark.slow
def test_two_preemptions_of_one_rank_then_resume_finishes_exactly(demo_env, tmp_path):
    run_dir, max_steps = tmp_path / "run", 40
    cmd = torchrun(run_dir, [f"trainer.max_steps={max_steps}", "trainer.save_every=1000", "deepspeed=zero2",
                             "data.num_workers=1", "eval.at_end=false"])
    first = _preempt_after(cmd, demo_env, run_dir, 0, tmp_path / "first.log", signal.SIGUSR1)
    stopped = first["step"]
    assert first["signal"] == "SIGUSR1" and 5 <= stopped < max_steps
    assert first["checkpoint"].endswith(f"step_{stopped:08d}")
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / "complete").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted_by"] == "SIGUSR1" and summary["step"] == stopped
    run_ids = {read_offline_run(p).run_id for p in find_offline_runs(run_dir)}

    # second preemption, by SIGTERM this time, after the resumed run has logged more steps
    second = _preempt_after(cmd, demo_env, run_dir, stopped, tmp_path / "second.log", signal.SIGTERM)
    assert f"at step {stopped}" in (tmp_path / "second.log").read_text()  # resumed from the first checkpoint
    assert second["signal"] == "SIGTERM" and stopped < second["step"] < max_steps
    stopped_again = second["step"]

    again = subprocess.run(cmd, env=demo_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"at step {stopped_again}" in again.stdout + again.stderr
    steps = [r["step"] for r in metrics(run_dir) if "train/loss" in r]
    assert steps[-1] == max_steps and {stopped, stopped_again} <= set(steps)  # partial intervals were logged
    assert steps == sorted(set(steps)), steps  # no step logged twice: the count continued each time
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == max_steps and summary["preempted_by"] is None
    runs = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert len(runs) == 3 and {r.run_id for r in runs} == run_ids == {summary["wandb_run_id"]}
