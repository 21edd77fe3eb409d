"""Nothing hangs (issue 14 items 0 and 7): error paths end every rank and worker, a killed launcher takes its
ranks along, one training per run dir, stale op-build locks cleared, and a run under a CPU hog completes.

The fast tests check the pieces in-process (run lock, build locks, a worker's TERM); the slow ones drive the
real CLI under torchrun with 2 ranks x 1 DataLoader worker, as a user would.
"""
from __future__ import annotations

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
from mmpt.engine.config import ConfigError
from mmpt.engine.run_lock import RunDirLocked, RunLock, lock_run_dir
from mmpt.torch_extensions import clear_stale_build_locks
from tests.dist_helpers import descendants, kill_tree

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


def test_the_cli_refuses_a_held_run_dir_with_one_error_line(tmp_path, capsys):
    from mmpt.cli.common import user_errors_exit

    held = RunLock(tmp_path)
    held.acquire()
    with pytest.raises(SystemExit) as exited:
        user_errors_exit(lock_run_dir)(tmp_path, True)  # as mmpt-train calls it, inside its user-error wrapper
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: run dir {tmp_path} is in use by another training (host {socket.gethostname()} "
                             f"pid {os.getpid()}")
    held.release()


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


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _kill_group(proc: subprocess.Popen) -> None:
    """Leave nothing behind when a test fails: the launcher and every descendant."""
    kill_tree(proc.pid)
    proc.wait()


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
def test_every_error_ends_every_rank_and_worker_within_60_s_of_its_message(demo_env, tmp_path, write_shards):
    """Three failing 2-rank runs at once (one launch each, run side by side to save wall time): a NaN loss, a
    step that raises on one rank (its peer dies mid-collective), an eval set with no usable pair."""
    empty_eval = write_shards([[{"__key__": f"s{i}", "txt": "a caption"} for i in range(4)]] * 2, name="eval")
    script = tmp_path / "failing_train.py"
    script.write_text(RAISE_IN_STEP)
    cases = {  # name -> (overrides, wrapper script, the error's message)
        "nan_loss": (["optimizer.lr=1e30", "trainer.max_bad_steps=3"], None, "training diverged"),
        "raise_in_step_on_one_rank": ([], script, "planted failure in a training step"),
        "empty_eval_set": (["eval.every=1", f"data.eval.urls=[{','.join(empty_eval)}]"], None,
                           "the eval set is empty on every rank"),
    }
    procs = {name: _start(_torchrun(tmp_path / name, ["trainer.max_steps=1000", "trainer.log_every=1", *over], wrap),
                          demo_env, tmp_path / f"{name}.log") for name, (over, wrap, _) in cases.items()}
    try:
        reported: dict[str, float] = {}
        ended: dict[str, float] = {}
        deadline = time.time() + 240  # start-up under load; the 60 s clock starts at each error message
        while len(reported) < len(cases) or any(p.poll() is None for p in procs.values()):
            for name, (_, _, message) in cases.items():
                if name not in reported and message in (tmp_path / f"{name}.log").read_text():
                    reported[name] = time.time()
                if name in reported and procs[name].poll() is None:
                    assert time.time() - reported[name] < 60, f"{name}: still running 60 s after its error"
                elif name in reported and name not in ended:
                    ended[name] = time.time()
                if name not in reported:
                    assert procs[name].poll() is None, f"{name}: ended without its error:\n" \
                                                       f"{(tmp_path / f'{name}.log').read_text()[-3000:]}"
            assert time.time() < deadline, {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in cases}
            time.sleep(0.1)
        for name, proc in procs.items():
            assert proc.returncode != 0, name
        print({name: f"exit {procs[name].returncode} {ended.get(name, time.time()) - at:.1f} s after the message"
               for name, at in reported.items()})
    finally:
        for proc in procs.values():
            _kill_group(proc)


@pytest.mark.slow
def test_a_killed_launcher_leaves_no_orphan_and_the_run_lock_refuses_then_takes_over(demo_env, tmp_path):
    """A stale lock of a dead run is taken over; while the run trains, a second run on its dir is refused
    naming the holder; kill -9 of the launcher's group ends both ranks and both workers."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "run.lock").write_text(json.dumps({"host": "oldhost", "pid": dead.pid, "started": 0}))
    proc = _start(_torchrun(run_dir, ["trainer.max_steps=100000", "trainer.log_every=1"]), demo_env, log)
    try:
        _wait_for(lambda: "took over the stale run lock" in log.read_text(), proc, log)  # then start the second
        assert f"took over the stale run lock {run_dir / 'run.lock'} of host oldhost pid {dead.pid}" in log.read_text()
        holder = json.loads((run_dir / "run.lock").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] in descendants(proc.pid)  # rank 0's
        with pytest.raises(ConfigError, match=f"host {holder['host']} pid {holder['pid']}"):
            lock_run_dir(run_dir, is_main=True)  # what a second mmpt-train on this dir meets (error line, exit 2)
        _wait_for(lambda: len(_steps(run_dir)) >= 1, proc, log)  # training, workers up
        family = descendants(proc.pid)  # 2 ranks + 2 workers (torchrun starts ranks in their own sessions)
        assert len(family) >= 4, family
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the launcher's process group: not the ranks' groups
        proc.wait()
        deadline = time.time() + 15
        while any(map(_alive, family)) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in family if _alive(pid)], "orphans of the killed launcher still run"
    finally:
        _kill_group(proc)


@pytest.mark.slow
def test_under_a_cpu_hog_a_run_completes_with_no_false_timeout_and_no_lost_step(demo_env, tmp_path):
    """Two busy processes saturate the 2 cores from the launch to the end of a 2-rank run with a 30 s
    distributed timeout: rendezvous, start-up and every training step run starved, and the run still trains
    to max_steps with every step logged once."""
    run_dir, log, max_steps = tmp_path / "run", tmp_path / "run.log", 40
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    started = time.time()
    proc = _start(_torchrun(run_dir, [f"trainer.max_steps={max_steps}", "trainer.log_every=1",
                                      "trainer.save_every=20", "trainer.dist_timeout_s=30"]), demo_env, log)
    try:
        rc = proc.wait(timeout=240)
    finally:
        _kill_group(proc)
        for h in hogs:  # busy until the run ended
            h.kill()
            h.wait()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "timeout 30 s (trainer.dist_timeout_s)" in text
    assert _steps(run_dir) == list(range(1, max_steps + 1))  # none lost, none repeated
    assert json.loads((run_dir / "summary.json").read_text())["step"] == max_steps
    print(f"under load: the whole run ({time.time() - started:.0f} s) ran beside 2 CPU hogs")




# ---- the distributed timeout is in force on every group --------------------------------------------------------
def _silent_peer_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 never joins the collectives; rank 0 times each one out (world group, and a group made later, as
    DeepSpeed and the preemption watch make theirs)."""
    import torch.distributed as dist

    from mmpt.engine.dist_env import DistEnv, init_process_group

    init_process_group(DistEnv(rank, rank, world, "127.0.0.1", port, "torchrun/deepspeed"), timeout_s=3)
    later = dist.new_group(backend="gloo")
    waited: dict[str, float | None] = {}
    if rank == 0:
        for name, group in (("world", None), ("later_group", later)):
            started = time.time()
            try:
                dist.all_reduce(torch.ones(1), group=group)
                waited[name] = None
            except RuntimeError:
                waited[name] = time.time() - started
        (Path(out_dir) / "done").touch()
    else:  # alive but silent until rank 0 is done (exiting would fail rank 0's wait at once, timeout or not)
        deadline = time.time() + 60
        while not (Path(out_dir) / "done").exists() and time.time() < deadline:
            time.sleep(0.05)
    torch.save(waited, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_a_rank_whose_peer_is_silent_raises_after_dist_timeout_s(tmp_path, monkeypatch):
    from tests.dist_helpers import run_ranks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    waited = run_ranks(_silent_peer_worker, tmp_path)[0]
    for name in ("world", "later_group"):  # torch's own default for a later group would be 30 minutes
        assert waited[name] is not None and 2.5 < waited[name] < 9, waited


def test_the_venvs_own_ninja_builds_ops_even_when_the_venv_is_not_activated(tmp_path):
    from mmpt.torch_extensions import use_venv_ninja

    system, venv = tmp_path / "usr" / "bin", tmp_path / "venv" / "bin"
    for folder in (system, venv):
        folder.mkdir(parents=True)
        (folder / "ninja").write_text("#!/bin/sh\n")
        (folder / "ninja").chmod(0o755)
    env = {"PATH": f"{system}{os.pathsep}/bin"}  # `.venv/bin/mmpt-train` run without activating the venv
    base = str(tmp_path / "python")
    assert use_venv_ninja(env, prefix=str(tmp_path / "venv"), base_prefix=base) == str(venv / "ninja")
    assert env["PATH"] == f"{venv}{os.pathsep}{system}{os.pathsep}/bin"
    assert use_venv_ninja(env, prefix=str(tmp_path / "venv"), base_prefix=base) == str(venv / "ninja")  # unchanged
    assert env["PATH"].count(str(venv)) == 1
    assert use_venv_ninja(env, prefix=str(tmp_path / "no_ninja_venv"), base_prefix=base) is None
    assert use_venv_ninja(env, prefix=str(tmp_path / "venv"), base_prefix=str(tmp_path / "venv")) is None  # no venv


# An error with a live worker and no `finally` anywhere: only the interpreter's exit can end the worker.
UNCLOSED_LOADER = '''
import torch
from torch.utils.data import IterableDataset
from mmpt.data.pipeline import make_loader

class Forever(IterableDataset):
    def __iter__(self):
        while True:
            yield {"x": torch.zeros(1)}

batches = iter(make_loader(Forever(), num_workers=1, pin_memory=False).dataloader)
next(batches)
raise RuntimeError("planted error with a live worker")
'''


@pytest.mark.slow  # a Python subprocess
def test_an_error_with_a_live_worker_and_no_close_still_exits():
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", UNCLOSED_LOADER], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 1 and "planted error with a live worker" in proc.stderr, proc.stderr[-2000:]
    assert time.time() - started < 30
