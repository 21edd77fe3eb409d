"""Where am I in the job? Derive rank / world from the launcher, then start the process group."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from mmpt.parent_death import die_with_parent
from mmpt.torch_extensions import use_venv_ninja, watch_build_locks

log = logging.getLogger("mmpt")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun/deepspeed" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _node_addr(node: str) -> str:
    """The address SLURM itself reaches `node` at (its NodeAddr, the node name on most clusters); the name
    when scontrol is unavailable. Node names need not resolve (a test cluster's node1/node2 do not)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return node
    match = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return match.group(1) if match else node


def _first_slurm_host(nodelist: str) -> str:
    """Rendezvous address: the first node of a SLURM node list such as `gpu[01-04,07],cpu3` (scontrol when
    available), as its NodeAddr."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return _node_addr(out.stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, IndexError):
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            first = rest.rstrip("]").split(",")[0].split("-")[0]
            return prefix + first
        return head


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun / deepspeed set RANK..MASTER_PORT; a bare `srun` sets only SLURM_*; else one process."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun/deepspeed",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(env: DistEnv, timeout_s: int) -> None:
    """Export the variables DeepSpeed expects and start nccl (GPU) or gloo (CPU) with a finite timeout.

    The timeout bounds every collective, on the world group AND on the groups DeepSpeed and mmpt create later
    (torch gives those its own 30-minute default otherwise): a rank whose peer died or hangs raises after it
    instead of waiting for ever. On nccl, async error handling makes the watchdog tear the rank down at the
    timeout even inside a kernel wait. Rank 0 prints the timeout in force."""
    os.environ.update(
        RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )
    if env.launcher == "torchrun/deepspeed":
        die_with_parent(signal.SIGKILL)  # a launcher killed with -9 takes its ranks along (no orphan training)
    if dist.is_initialized():
        return
    watch_build_locks()  # DeepSpeed may JIT-build an op next: a killed earlier build's lock must not hang us
    use_venv_ninja()  # ... and with one ninja for every process of this venv, or each start rebuilds it
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(env))
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a user's own choice wins
    timeout = timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout  # read by torch's _get_default_timeout for every later new_group
    c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    if env.is_main:
        log.info("distributed: %s, %d rank(s), timeout %d s (trainer.dist_timeout_s): a rank whose peer stops "
                 "responding raises after that long", backend, env.world_size, timeout_s)
