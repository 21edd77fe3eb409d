"""Spawning real gloo process groups in tests: a free port, and "run this worker on N ranks, collect results".
The ranks fork from one preloaded forkserver per session (`spawn`): a fresh interpreter each time cost ~3 s.

A worker has the signature `worker(rank, world, port, out_dir)` and saves its results to `out_dir/rank{r}.pt`.
"""
from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

mp.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo", "deepspeed"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_spawned(rank: int, cwd: str, environ: dict[str, str], worker: Callable[..., None], *args: Any) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    if environ.get("OMP_NUM_THREADS"):  # torch read it when the forkserver imported it: the caller's value wins
        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    worker(rank, *args)


def spawn(worker: Callable[..., None], args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn` in effect, for less start-up: each process forks from one forkserver (per
    test session) that has imported torch, torch._dynamo and DeepSpeed already, where a spawned one imports
    them again (~3 s of CPU each), then takes the caller's current directory and environment, as a spawned
    process would."""
    mp.start_processes(_as_spawned, args=(os.getcwd(), dict(os.environ), worker, *args), nprocs=nprocs, join=True,
                       start_method="forkserver")


def run_ranks(worker: Callable[..., None], out_dir: Path, world: int = 2) -> list[Any]:
    """Run `worker` on `world` gloo ranks and return what each rank saved, in rank order."""
    spawn(worker, (world, free_port(), str(out_dir)), world)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant at once (like a node failure); gone ones are skipped."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
