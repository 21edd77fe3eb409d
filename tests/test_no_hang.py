"""Nothing hangs (issue 14 items 0 and 7): error paths end every rank and worker, a killed launcher takes its
ranks along, one training per run dir, stale op-build locks cleared, and a run under a CPU hog completes.

The fast tests check the pieces in-process (run lock, build locks, a worker's TERM); the slow ones drive the
real CLI under torchrun with 2 ranks x 1 DataLoader worker, as a user would.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from mmpt import torch_extensions
from mmpt.data.pipeline import make_loader
from mmpt.engine.run_lock import RunDirLocked, RunLock
from mmpt.torch_extensions import clear_stale_build_locks

BIN = Path(sys.executable).parent
TINY = ["experiment=clip_tiny", "data.image_size=32", "data.batch_size=8", "data.num_workers=1",
        "eval.at_end=false", "logger=none"]


# ---- the run-dir lock --------------------------------------------------------------------------------------
def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    held = RunLock(tmp_path)
    assert held.acquire() is None  # a fresh dir: nothing to take over
    body = json.loads((tmp_path / "run.lock").read_text())
    assert body["pid"] == os.getpid() and body["host"] == socket.gethostname()
    with pytest.raises(RunDirLocked) as refused:
        RunLock(tmp_path).acquire()  # a second open file description: flock conflicts even in one process
    assert f"host {socket.gethostname()} pid {os.getpid()}" in str(refused.value)
    held.release()
    assert not (tmp_path / "run.lock").exists()  # a clean end leaves nothing to take over
    again = RunLock(tmp_path)
    assert again.acquire() is None
    again.release()


def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node7", "pid": dead.pid, "started": 0}))
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note is not None and f"host node7 pid {dead.pid}" in note and "stale" in note
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


# ---- stale DeepSpeed / torch op-build locks -------------------------------------------------------------------
def _aged_lock(root: Path, name: str, age_s: float) -> Path:
    lock = root / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_an_op_build_lock_nobody_holds_is_removed_and_a_held_one_kept(tmp_path):
    stale = _aged_lock(tmp_path, "deepspeed_shm_comm", 5)
    held = _aged_lock(tmp_path, "other_op", 5)
    fd = os.open(held, os.O_RDONLY)  # like torch's builder, which keeps the fd of the lock it created
    try:
        messages = clear_stale_build_locks(tmp_path, confirm_s=0.05)
    finally:
        os.close(fd)
    assert not stale.exists() and held.exists()
    assert len(messages) == 1 and str(stale) in messages[0] and "removed the stale" in messages[0]


def test_on_a_shared_filesystem_only_an_old_lock_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_extensions, "_on_network_fs", lambda path: True)  # a builder may run elsewhere
    young = _aged_lock(tmp_path, "young_op", 60)
    old = _aged_lock(tmp_path, "old_op", torch_extensions.STALE_AFTER_S + 60)
    messages = sorted(clear_stale_build_locks(tmp_path, confirm_s=0.05))
    assert young.exists() and not old.exists()
    assert messages[0].startswith("removed the stale") and str(old) in messages[0]
    assert messages[1].startswith("waiting on the op-build lock") and str(young) in messages[1]


# ---- DataLoader workers: deaf to SLURM's TERM while training, gone once the loader shuts down ---------------
class _Forever(IterableDataset):
    def __iter__(self):
        while True:
            yield {"pid": torch.tensor(os.getpid())}


def test_a_worker_ignores_term_while_training_and_ends_on_close():
    loader = make_loader(_Forever(), num_workers=1, pin_memory=False)
    batches = iter(loader.dataloader)
    worker = int(next(batches)["pid"])
    os.kill(worker, signal.SIGTERM)  # SLURM's TERM reaches every process of the task
    time.sleep(0.5)
    assert Path(f"/proc/{worker}").exists() and _state(worker) != "Z"
    next(batches)  # still serving
    loader.close()
    assert not _alive(worker)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _alive(pid: int) -> bool:
    return _state(pid) not in ("gone", "Z", "X")


# ---- the real CLI under torchrun: 2 ranks x 1 worker ----------------------------------------------------------
def _torchrun(run_dir: Path, overrides: list[str], script: Path | None = None) -> list[str]:
    """torchrun of mmpt-train (or of a Python script that wraps it) on 2 ranks."""
    program = [str(script)] if script else ["--no-python", str(BIN / "mmpt-train")]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *program, *TINY, *overrides,
            f"hydra.run.dir={run_dir}"]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout_s: float = 120, may_end: bool = False) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if may_end and proc.poll() is not None:
            return
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


# A training step that raises on rank 1 only: rank 0's peer dies under it, mid-collective.
RAISE_IN_STEP = '''
import sys
from mmpt.engine import trainer
from mmpt.cli.train import main

real_step = trainer.Trainer._micro_step

def failing_step(self, batch, stats):
    if self.env.rank == 1 and self.step == 2:
        raise RuntimeError("planted failure in a training step")
    return real_step(self, batch, stats)

trainer.Trainer._micro_step = failing_step
sys.argv[0] = "mmpt-train"
main()
'''


@pytest.mark.slow
@pytest.mark.parametrize("error", ["nan_loss", "raise_in_step_on_one_rank", "empty_eval_set"])
def test_an_error_ends_every_rank_and_worker_within_60_s(demo_env, tmp_path, write_shards, error):
    run_dir, log, script = tmp_path / "run", tmp_path / "run.log", None
    overrides = ["trainer.max_steps=1000", "trainer.log_every=1"]
    expected = {"nan_loss": "loss is nan", "raise_in_step_on_one_rank": "planted failure in a training step",
                "empty_eval_set": "the eval set is empty on every rank"}[error]
    if error == "nan_loss":
        overrides.append("optimizer.lr=1e30")
    elif error == "raise_in_step_on_one_rank":
        script = tmp_path / "failing_train.py"
        script.write_text(RAISE_IN_STEP)
    else:  # eval shards that hold no usable pair (captions only): the eval at step 1 has nothing to score
        shards = write_shards([[{"__key__": f"s{i}", "txt": "a caption"} for i in range(4)]] * 2, name="eval")
        overrides += ["eval.every=1", f"data.eval.urls=[{','.join(shards)}]"]
    with log.open("w") as out:
        proc = subprocess.Popen(_torchrun(run_dir, overrides, script), env=demo_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:  # start-up time depends on the machine's load: the clock starts at the error message
            _wait_for(lambda: expected in log.read_text(), proc, log, timeout_s=240, may_end=True)
            reported = time.time()
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{error}: still running 60 s after the error:\n{log.read_text()[-3000:]}")
        finally:
            _kill_group(proc)
    assert rc != 0 and expected in log.read_text()
    print(f"{error}: exit {rc} {time.time() - reported:.1f} s after the error message")


def _kill_group(proc: subprocess.Popen) -> None:
    """Leave nothing behind when a test fails: the launcher's group and every descendant."""
    from tests.test_train_e2e import descendants

    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.slow
def test_a_killed_launcher_leaves_no_rank_or_worker_and_a_stale_run_lock_is_taken_over(demo_env, tmp_path):
    from tests.test_train_e2e import descendants

    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "run.lock").write_text(json.dumps({"host": "oldhost", "pid": dead.pid, "started": 0}))
    with log.open("w") as out:
        proc = subprocess.Popen(_torchrun(run_dir, ["trainer.max_steps=100000", "trainer.log_every=1"]),
                                env=demo_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: len(_steps(run_dir)) >= 2, proc, log)
            assert f"took over the stale run lock {run_dir / 'run.lock'} of host oldhost pid {dead.pid}" in log.read_text()
            family = descendants(proc.pid)  # 2 ranks + 2 workers (torchrun starts ranks in their own sessions)
            assert len(family) >= 4, family
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the launcher's process group
            proc.wait()
            deadline = time.time() + 15
            while any(map(_alive, family)) and time.time() < deadline:
                time.sleep(0.1)
            assert not [pid for pid in family if _alive(pid)], "orphans of the killed launcher still run"
        finally:
            _kill_group(proc)


@pytest.mark.slow
def test_under_a_cpu_hog_a_run_loses_no_step_and_a_second_run_on_its_dir_is_refused(demo_env, tmp_path):
    """Two busy processes saturate the 2 cores for HOG_S seconds while a 2-rank run trains with a short
    distributed timeout; then SLURM-style USR1 makes it checkpoint and exit 0."""
    from tests.test_train_e2e import descendants

    hog_s, run_dir, log = 20, tmp_path / "run", tmp_path / "run.log"
    overrides = ["trainer.max_steps=100000", "trainer.log_every=1", "trainer.dist_timeout_s=30",
                 "trainer.preempt_check_every=1"]
    with log.open("w") as out:
        proc = subprocess.Popen(_torchrun(run_dir, overrides), env=demo_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for(lambda: len(_steps(run_dir)) >= 1, proc, log)
            hog = f"import time\nend = time.time() + {hog_s}\nwhile time.time() < end: pass"
            hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(2)]
            steps_before_hog = len(_steps(run_dir))
            holder = json.loads((run_dir / "run.lock").read_text())
            second = subprocess.run([str(BIN / "mmpt-train"), *TINY, f"hydra.run.dir={run_dir}"], env=demo_env,
                                    capture_output=True, text=True, timeout=120)
            for h in hogs:
                h.wait()
            steps_under_hog = len(_steps(run_dir))
            assert proc.poll() is None, f"the run did not survive the hog:\n{log.read_text()[-3000:]}"
            for pid in descendants(proc.pid):  # SLURM signals every process of the job, workers too
                os.kill(pid, signal.SIGUSR1)
            rc = proc.wait(timeout=60)
        finally:
            _kill_group(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "timeout 30 s (trainer.dist_timeout_s)" in text
    steps = _steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # none lost, none repeated
    assert steps_under_hog > steps_before_hog, "no progress while the hog ran"
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == steps[-1]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
    assert f"in use by another training (host {holder['host']} pid {holder['pid']}" in errors[0]
    print(f"{len(steps)} steps, {steps_under_hog - steps_before_hog} of them during the {hog_s} s hog")
