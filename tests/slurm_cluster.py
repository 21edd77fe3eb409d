"""Session fixture `slurm_cluster`: a real local SLURM (scripts/local_slurm.sh) that tests submit jobs to.

Use it from any test module with

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (pytest finds the fixture by this name)

It starts the cluster when it is not running (installing the Debian packages the first time) and stops it
at the end of the session only if this session started it and no other live test session uses it (each
session leaves a lease file). It skips, naming the reason, only where this machine cannot host the cluster:
not root, no apt-get, no Debian slurm packages (local_slurm.sh's exit code 4). Any other failure to start
fails the tests that need it, with the script's output.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local_slurm.sh"
CANNOT_HOST = 4  # local_slurm.sh: this machine cannot host the cluster
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                      "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"})


def tail(path: Path | str | None, chars: int = 6000) -> str:
    """The end of a (job log) file for an assertion message."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"\n---- {path}: {exc}"
    return f"\n---- last {min(chars, len(text))} chars of {path}:\n{text[-chars:]}"


@dataclass
class SlurmCluster:
    """The running local cluster: its config, and helpers to submit and follow jobs."""

    state_dir: Path
    conf: Path
    started_here: bool
    partition: str = "debug"
    nodes: tuple[str, ...] = ("node1", "node2")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with SLURM_CONF pointing at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, script: Path | str, args: Sequence[str] = (), sbatch_args: Sequence[str] = (),
               cwd: Path | str | None = None, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        proc = subprocess.run(cmd, env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch failed ({proc.returncode}): {proc.stderr}{proc.stdout}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (first occurrence of each key); {} once the job left the controller."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(\w+)=(\S*)", proc.stdout):
            fields.setdefault(key, value)
        return fields

    def sacct(self, job_id: str, fields: str = "JobID,State,ExitCode,NNodes,NTasks,NodeList",
              duplicates: bool = False) -> list[dict[str, str]]:
        """Accounting rows of a job and its steps (`duplicates`: also earlier runs of a requeued job)."""
        cmd = ["sacct", "-a", "-n", "-P", "-j", job_id, "-o", fields, *(["-D"] if duplicates else [])]
        out = self.run(*cmd, check=False).stdout
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]

    def final_accounting(self, job_id: str, fields: str = "JobID,State,ExitCode,NNodes,NTasks,NodeList",
                         duplicates: bool = False, timeout: float = 60) -> list[dict[str, str]]:
        """`sacct` rows once accounting caught up with a finished job: its last row and every step row
        in a final state (sacct lags the controller by a moment)."""
        if "State" not in fields.split(",") or "JobID" not in fields.split(","):
            fields = f"JobID,State,{fields}"
        final = TERMINAL | {"REQUEUED"}
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sacct(job_id, fields, duplicates)
            mains = [r for r in rows if r["JobID"] == job_id]
            if mains and mains[-1]["State"].split()[0] in TERMINAL and \
                    all(r["State"].split()[0] in final for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"sacct did not settle for job {job_id} in {timeout:.0f} s: {rows}")
            time.sleep(0.5)

    def state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETED, ... from the controller, else from accounting; '' when unknown."""
        info = self.job(job_id)
        if info.get("JobState"):
            return info["JobState"]
        rows = [r for r in self.sacct(job_id, "JobID,State") if r["JobID"] == job_id]
        return rows[-1]["State"].split()[0] if rows else ""

    def release_requeued(self, job_id: str) -> None:
        """Start a requeued job soon instead of after its ~120 s BeginTime hold. Not at once: slurmd revokes
        the old run's credential with one-second resolution, and a relaunch in that same second is killed
        ("Job credential revoked") and the job ends FAILED."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")

    def wait(self, job_id: str, states: frozenset[str] | set[str] = TERMINAL, timeout: float = 600,
             log: Path | str | None = None, poll: float = 0.5) -> str:
        """Poll until the job is in one of `states`; fails (with the job log) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise AssertionError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s "
                             f"(waiting for {sorted(states)}){tail(log)}")


def _script(cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=1200)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("local SLURM cluster needs root (scripts/local_slurm.sh installs Debian packages and runs the daemons)")
    state_dir = Path(os.environ.get("MMPT_LOCAL_SLURM_DIR", "/tmp/mmpt-slurm"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job's own variables
    started_here = False
    if _script("status", env).returncode != 0:
        proc = _script("start", env)
        if proc.returncode == CANNOT_HOST:
            pytest.skip(f"local SLURM cluster unavailable on this machine: {proc.stderr.strip().splitlines()[-1]}")
        if proc.returncode != 0:
            pytest.fail(f"scripts/local_slurm.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        started_here = "already running" not in proc.stdout
    leases = state_dir / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    lease = leases / str(os.getpid())
    lease.write_text("pytest session using the cluster\n")
    previous = os.environ.get("SLURM_CONF")
    cluster = SlurmCluster(state_dir=state_dir, conf=state_dir / "etc" / "slurm.conf", started_here=started_here)
    os.environ["SLURM_CONF"] = str(cluster.conf)  # subprocesses (sbatch, srun, submitit) find the cluster
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        lease.unlink(missing_ok=True)
        others = [p for p in leases.iterdir() if p.name.isdigit() and _pid_alive(int(p.name))]
        if started_here and not others:
            proc = _script("stop", env)
            if proc.returncode != 0:
                print(f"scripts/local_slurm.sh stop failed:\n{proc.stdout}\n{proc.stderr}")
        elif started_here:
            print(f"local SLURM left running: still used by test sessions {[p.name for p in others]}")
