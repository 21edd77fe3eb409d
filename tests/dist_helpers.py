"""Spawning real gloo process groups in tests: a free port, and "run this worker on N ranks, collect results".

A worker has the signature `worker(rank, world, port, out_dir)` and saves its results to `out_dir/rank{r}.pt`.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable[..., None], out_dir: Path, world: int = 2) -> list[Any]:
    """Run `worker` on `world` gloo ranks and return what each rank saved, in rank order."""
    mp.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
