"""Two gloo ranks with a real DeepSpeed engine (ZeRO-1: rank 0 writes the model states, each rank its optimizer
partition) that save checkpoints the way the trainer does and break the saves on purpose;
tests/test_atomic_checkpoints.py runs them and checks what they leave on disk.

`python -m tests.atomic_ckpt_worker OUT [--tmpfs]` is rank 0; it starts rank 1 (`... OUT --tmpfs? --rank 1
--port P`) as its child, so under `unshare -rm` both ranks share the mount namespace. Scenarios, in order, each
under OUT/<name>/checkpoints:
  keep      steps 1, 2, 3 with keep_last=2, then step 15 after steps 10, 20 with keep_last=1
  raise     rollback to step 2, re-save step 3: every rank raises after writing half of its first file
  full      the same re-save; rank 1 alone gets ENOSPC half-way through its partition (injected)
  tmpfs     (--tmpfs, under `unshare -rm`) a tmpfs of 1.5 checkpoints as the checkpoint dir: a real full disk
  kill      the same re-save; every rank SIGKILLs itself half-way through its first file
Every parameter of the toy model holds one number, the `version` it was saved with, so a tag's weights say
which save wrote them. Each rank writes OUT/rank{r}.json before the final kill.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from mmpt import distributed as mdist
from mmpt.engine import checkpoint
from mmpt.engine.checkpoint_integrity import CheckpointError, manifest, tag_problem
from tests.dist_helpers import free_port

EXTRA = {"config.yaml": "model: toy\n"}
WORLD = 2


def start_gloo(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed

    # generous: under load, ranks wait their turn for the DeepSpeed op-build lock before they meet
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=300), verbose=False)


def build_engine() -> Any:
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    config = {"train_batch_size": WORLD, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def set_version(engine: Any, version: float) -> None:
    with torch.no_grad():
        for p in engine.module.parameters():
            p.fill_(version)


def version_of(engine: Any) -> float:
    values = torch.cat([p.detach().flatten() for p in engine.module.parameters()]).unique()
    assert values.numel() == 1, values
    return float(values[0])


def save(engine: Any, root: Path, step: int, keep_last: int = 2, version: float | None = None) -> Path:
    set_version(engine, float(step) if version is None else version)
    return checkpoint.save(engine, root, step, {"step": step}, keep_last, EXTRA)


def listing(root: Path) -> dict[str, Any]:
    """What a reader sees: complete tags, hidden leftovers, `latest`, and whether each tag is whole."""
    mdist.barrier()  # rank 0's cleanups are done
    latest = root / checkpoint.LATEST_FILE
    seen = {"complete": [p.name for p in checkpoint.complete_checkpoints(root)],
            "hidden": sorted(p.name for p in root.iterdir() if p.name.startswith(".")),
            "latest": latest.read_text() if latest.is_file() else None,
            "problems": {p.name: tag_problem(p) for p in checkpoint.tag_dirs(root)}}
    mdist.barrier()  # ... and not started before every rank looked
    return seen


def loaded_version(engine: Any, tag_dir: Path) -> float:
    """Collective: the version a resume from `tag_dir` restores."""
    set_version(engine, -1.0)
    checkpoint.load(engine, tag_dir)
    return version_of(engine)


class Boom(Exception):
    """Stands in for anything that stops a save half-way (an exception from deep inside a writer)."""


def half_write_then(action: Callable[[], None]) -> Callable[[Any, str], None]:
    """A checkpoint-engine save that writes half of the file, then calls `action` (raise, or kill the process)."""

    def save(state_dict: Any, path: str) -> None:
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        Path(path).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        action()

    return save


def rollback_and_resave(engine: Any, root: Path, broken_save: Callable[[Any, str], None] | None) -> str | None:
    """Tags 1-3 saved; resume from step 2, train on (version 3.5) and save step 3 again, this rank writing
    through `broken_save` (None: as usual). Returns the name of what the re-save raised here."""
    for step in (1, 2, 3):
        save(engine, root, step, keep_last=3)
    checkpoint.load(engine, root / checkpoint.tag_for(2))
    original = engine.checkpoint_engine.save
    engine.checkpoint_engine.save = broken_save or original
    try:
        save(engine, root, 3, keep_last=3, version=3.5)
    except (Boom, CheckpointError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        engine.checkpoint_engine.save = original
    return None


def boom() -> None:
    raise Boom("stopped between files")


def no_space() -> None:
    raise OSError(28, os.strerror(28))


def scenario_keep(engine: Any, out: Path) -> dict[str, Any]:
    root = out / "keep" / "checkpoints"
    seen = []
    for step in (1, 2, 3):
        save(engine, root, step, keep_last=2)
        seen.append(listing(root))
    for step in (10, 20):
        save(engine, root, step, keep_last=2)
    save(engine, root, 15, keep_last=1)  # resumed from 10 with another save_every: 15 is older than 20 yet stays
    return {"after_each": seen, "after_15": listing(root),
            "size": sum(manifest(root / checkpoint.tag_for(15)).values()),
            "version_15": loaded_version(engine, root / checkpoint.tag_for(15))}


def scenario_raise(engine: Any, out: Path) -> dict[str, Any]:
    root = out / "raise" / "checkpoints"
    raised = rollback_and_resave(engine, root, half_write_then(boom))
    seen = listing(root)
    removed = [p.name for p in checkpoint.remove_stale_saves(root)] if mdist.rank() == 0 else None
    return {"raised": raised, "seen": seen, "removed": removed, "after_cleanup": listing(root),
            "version_3": loaded_version(engine, root / checkpoint.tag_for(3))}


def scenario_full(engine: Any, out: Path) -> dict[str, Any]:
    root = out / "full" / "checkpoints"
    raised = rollback_and_resave(engine, root, half_write_then(no_space) if mdist.rank() == 1 else None)
    return {"raised": raised, "seen": listing(root),
            "versions": {t: loaded_version(engine, root / checkpoint.tag_for(t)) for t in (1, 2, 3)}}


def scenario_tmpfs(engine: Any, out: Path, checkpoint_bytes: int) -> dict[str, Any]:
    root = out / "tmpfs" / "checkpoints"
    if mdist.rank() == 0:  # rank 1 runs in the same mount namespace and sees the mount
        root.mkdir(parents=True)
        size_kb = (checkpoint_bytes * 3 // 2) // 1024 + 8
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(root)], check=True)
    mdist.barrier()
    save(engine, root, 1)
    try:
        save(engine, root, 2)
        raised = None
    except CheckpointError as exc:
        raised = f"{type(exc).__name__}: {exc}"
    result = {"raised": raised, "seen": listing(root),
              "version_1": loaded_version(engine, root / checkpoint.tag_for(1))}
    mdist.barrier()
    if mdist.rank() == 0:
        subprocess.run(["umount", str(root)], check=True)
    return result


def scenario_kill(engine: Any, out: Path) -> None:
    root = out / "kill" / "checkpoints"
    rollback_and_resave(engine, root, half_write_then(lambda: os.kill(os.getpid(), signal.SIGKILL)))
    raise AssertionError("not killed")


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    tmpfs = "--tmpfs" in args
    if "--rank" in args:
        rank, port = 1, int(args[args.index("--port") + 1])
    else:  # rank 0 starts rank 1; both die in the kill scenario, so nobody waits for it
        rank, port = 0, free_port()
        subprocess.Popen([sys.executable, "-m", "tests.atomic_ckpt_worker", str(out), *args, "--rank", "1",
                          "--port", str(port)])
    start_gloo(rank, port)
    engine = build_engine()
    results: dict[str, Any] = {"keep": scenario_keep(engine, out)}
    results["raise"] = scenario_raise(engine, out)
    results["full"] = scenario_full(engine, out)
    if tmpfs:
        results["tmpfs"] = scenario_tmpfs(engine, out, results["keep"]["size"])
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    mdist.barrier()
    scenario_kill(engine, out)


if __name__ == "__main__":
    main()
