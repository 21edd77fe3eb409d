"""Checkpoints: DeepSpeed tags under <run dir>/checkpoints, written aside and renamed into place, pruning, RNG state.

Every rank writes its files into `checkpoints/.tmp-<tag>-<pid>/<tag>/`; once all of them succeeded, rank 0 adds
the `complete` marker (with each file's size) and renames the tag into `checkpoints/<tag>`. A tag that already
exists (the same step saved again after a rollback) is first renamed away whole, then deleted. So a reader, or
a run killed at any moment, sees the previous tag or the new one, never a half-written tag marked complete.
Hidden leftovers of a killed save are ignored by readers and removed at the next start. A failed write on any
rank (disk full) removes the staging dir and stops every rank with one `error:` line; earlier tags stay intact,
because pruning runs only after the new tag is in place and never removes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpt import distributed as mdist
from mmpt.engine.checkpoint_integrity import (COMPLETE_MARKER, CheckpointError, describe_write_failure, manifest,
                                              tag_problem)

log = logging.getLogger("mmpt")

TAG_PREFIX = "step_"
TAG_PATTERN = re.compile(rf"{TAG_PREFIX}\d+")
STAGING_PREFIX = ".tmp-"  # a save in progress: .tmp-<tag>-<pid>/<tag>/
TRASH_PREFIX = ".trash-"  # a replaced or pruned tag, renamed away whole before its files are deleted
LATEST_FILE = "latest"  # DeepSpeed's pointer to the newest tag (zero_to_fp32.py reads it); kept atomic here
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag_dir: Path) -> int:
    return int(tag_dir.name[len(TAG_PREFIX):])


def tag_dirs(ckpt_root: Path) -> list[Path]:
    """Every `step_*` dir, complete or not, oldest first (staging and trash dirs are hidden, never listed)."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if TAG_PATTERN.fullmatch(p.name) and p.is_dir()), key=step_of)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete tag dirs, oldest first."""
    return [p for p in tag_dirs(ckpt_root) if (p / COMPLETE_MARKER).is_file()]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- saving ---------------------------------------------------------------------------------------------------
def save(engine: Any, ckpt_root: Path, step: int, client_state: dict[str, Any], keep_last: int,
         extra_files: dict[str, str] | None = None) -> Path:
    """Collective: every rank must call it. Writes the tag aside, renames it into place, then prunes; raises
    CheckpointError on every rank (after removing the partial save) when any rank's write failed."""
    tag = tag_for(step)
    is_main = mdist.rank() == 0
    staging = ckpt_root / f"{STAGING_PREFIX}{tag}-{os.getpid()}"
    failure = _attempt(lambda: staging.mkdir(parents=True, exist_ok=True), staging) if is_main else None
    gathered = mdist.all_gather_objects((failure, str(staging)))
    failure, staging = _first_failure(f for f, _ in gathered), Path(str(gathered[0][1]))  # rank 0's name
    if failure is None:
        failure = _first_failure(mdist.all_gather_objects(_write_rank_files(engine, staging, tag, client_state)))
    if failure is None:
        if is_main:
            marker = {"step": step, "world_size": mdist.world_size(), "zero_stage": engine.zero_optimization_stage()}
            failure = _attempt(lambda: _commit(staging, tag, marker, extra_files or {}), staging)
        failure = _first_failure(mdist.all_gather_objects(failure))
    if failure is not None:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        mdist.barrier()  # every rank raises once the partial save is gone
        raise CheckpointError(_save_failed_message(ckpt_root, tag, failure, keep_last))
    tag_dir = ckpt_root / tag
    if is_main:
        _point_latest(ckpt_root, tag)
        prune(ckpt_root, keep_last, keep=tag_dir)
    mdist.barrier()
    return tag_dir


Failure = tuple[str, bool]  # (what failed, in words; whether the disk is full)


def _attempt(write: Callable[[], Any], path: Path) -> Failure | None:
    try:
        write()
    except (OSError, RuntimeError) as exc:  # torch.save's zip writer reports a full disk as RuntimeError
        return describe_write_failure(exc, path)
    return None


def _first_failure(failures: Iterator[Any] | list[Any]) -> Failure | None:
    return next((f for f in failures if f is not None), None)


def _write_rank_files(engine: Any, staging: Path, tag: str, client_state: dict[str, Any]) -> Failure | None:
    """This rank's DeepSpeed files and RNG state under staging/tag. Every rank goes through all of DeepSpeed's
    collectives even when a write fails, so the ranks can agree on the outcome afterwards instead of hanging."""
    failed: list[Failure] = []
    with _recording_write_failures(engine.checkpoint_engine, failed):
        try:
            # Frozen parameters (model.freeze, momentum teachers) are not in the optimizer: only the module state
            # dict carries them, so they must never be excluded from it.
            engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=False)
        except OSError as exc:
            # The one write outside checkpoint_engine.save: rank 0 copying DeepSpeed's recovery scripts, right
            # before save_checkpoint's closing barrier, which this rank still owes its peers.
            failed.append(describe_write_failure(exc, staging / tag))
            mdist.barrier()
    if not failed:
        rng_file = staging / tag / f"rng_rank{mdist.rank():05d}.pt"
        failure = _attempt(lambda: torch.save(rng_state(), rng_file), rng_file)
        failed += [failure] if failure else []
    return failed[0] if failed else None


@contextmanager
def _recording_write_failures(ckpt_engine: Any, failed: list[Failure]) -> Iterator[None]:
    """DeepSpeed writes every state file through its checkpoint engine's save(): record a failure there (and
    skip the rest of the writes) instead of raising out of the middle of DeepSpeed's collective save."""
    original = ckpt_engine.save

    def save(state_dict: Any, path: str) -> None:
        if failed:
            return
        failure = _attempt(lambda: original(state_dict, path), Path(path))
        if failure:
            failed.append(failure)

    ckpt_engine.save = save
    try:
        yield
    finally:
        ckpt_engine.save = original


def _commit(staging: Path, tag: str, marker: dict[str, Any], extra_files: dict[str, str]) -> Path:
    """Rank 0, once every rank's files exist: extras and marker into the staged tag, then rename it in."""
    staged, final = staging / tag, staging.parent / tag
    for name, text in extra_files.items():
        (staged / name).write_text(text)
    (staged / COMPLETE_MARKER).write_text(json.dumps({**marker, "files": manifest(staged)}))
    if final.exists():  # the same step saved again after a rollback: the old tag leaves whole first
        _discard(final)
    os.rename(staged, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def _discard(tag_dir: Path) -> None:
    """Rename away (atomic: readers stop seeing it at once), then delete; a kill in between leaves trash that
    the next start removes, never a tag with some files gone and its marker still there."""
    trash = tag_dir.parent / f"{TRASH_PREFIX}{tag_dir.name}-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(tag_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _point_latest(ckpt_root: Path, tag: str) -> None:
    """DeepSpeed's `latest` file names the tag just saved; replaced atomically. Best effort: on failure it is
    removed rather than left naming a tag that pruning may delete."""
    tmp = ckpt_root / f"{STAGING_PREFIX}{LATEST_FILE}-{os.getpid()}"
    try:
        tmp.write_text(tag)
        os.replace(tmp, ckpt_root / LATEST_FILE)
    except OSError as exc:
        log.warning("could not update %s (%s); removing it", ckpt_root / LATEST_FILE, exc)
        for path in (tmp, ckpt_root / LATEST_FILE):
            path.unlink(missing_ok=True)


def prune(ckpt_root: Path, keep_last: int, keep: Path) -> None:
    """Keep `keep` (the tag just saved, complete) and the newest keep_last - 1 other complete tags. `keep` may
    be older than tags left from before a rollback; it stays all the same."""
    others = [p for p in complete_checkpoints(ckpt_root) if p.name != keep.name]
    for old in others[: max(len(others) - (keep_last - 1), 0)]:
        try:
            _discard(old)
        except OSError as exc:
            log.warning("could not prune checkpoint %s: %s", old, exc)


def remove_stale_saves(ckpt_root: Path) -> list[Path]:
    """Staging and trash dirs that a killed run left behind. Call at start, before this run saves: one run
    writes to a run dir at a time, so nothing else is writing them."""
    if not ckpt_root.is_dir():
        return []
    stale = [p for p in ckpt_root.iterdir() if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX))]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d leftover(s) of an interrupted checkpoint save: %s", len(stale),
                 ", ".join(p.name for p in stale))
    return stale


def _save_failed_message(ckpt_root: Path, tag: str, failure: Failure, keep_last: int) -> str:
    what, disk_full = failure
    last = latest_checkpoint(ckpt_root)
    kept = f"the last complete checkpoint, {last}, is intact" if last else "there is no earlier complete checkpoint"
    if disk_full:
        size = f"about {sum(manifest(last).values()) / 1e6:.1f} MB each, " if last else ""
        fix = (f"free space on that filesystem or point hydra.run.dir at a larger disk (checkpoints take {size}"
               f"trainer.keep_last={keep_last} are kept plus the one being written), then rerun the same command "
               "to resume")
    else:
        fix = f"make sure {ckpt_root} is writable, then rerun the same command to resume"
    return (f"could not save checkpoint {tag} in {ckpt_root}: {what}; the partial save was removed and {kept}. "
            f"Fix: {fix}")


# ---- reading -------------------------------------------------------------------------------------------------
def check_tag(tag_dir: Path, fix: str | None = None) -> Path:
    """`tag_dir` when it is whole; else CheckpointError naming what is wrong and an earlier complete tag."""
    problem = tag_problem(tag_dir)
    if problem is None:
        return tag_dir
    if fix is None:
        others = [p for p in complete_checkpoints(tag_dir.parent) if p.name != tag_dir.name and tag_problem(p) is None]
        fix = (f"use another one, e.g. {others[-1]}," if others else "no other complete checkpoint is next to it;")
        fix += f" or delete {tag_dir}"
    raise CheckpointError(f"checkpoint {tag_dir} {problem}; {fix}")


def load(engine: Any, tag_dir: Path, own_root: Path | None = None) -> dict[str, Any]:
    """Collective. Restores model/optimizer/scheduler via DeepSpeed and this rank's RNG; returns client state.

    Only a tag in the run's own checkpoints dir (`own_root`, which this user's trainer wrote) is fully
    unpickled. A tag elsewhere (`trainer.resume=PATH`, maybe downloaded) is read with the weights-only
    unpickler (mmpt.engine.safe_load), DeepSpeed's own reads included, and refused if it needs more.
    """
    from mmpt.engine.safe_load import UnsafeCheckpointError, numpy_rng_safe_globals, refuse_unsafe_in

    own = own_root is not None and tag_dir.resolve().parent == Path(own_root).resolve()
    rng_file = tag_dir / f"rng_rank{mdist.rank():05d}.pt"
    try:
        with contextlib.nullcontext() if own else refuse_unsafe_in(tag_dir, numpy_rng_safe_globals()):
            _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            if client_state is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir} (see its log lines above); "
                                      "resume from another one with trainer.resume=<tag dir>")
            rng = torch.load(rng_file, weights_only=not own) if rng_file.is_file() else None
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(
            f"trainer.resume: {exc}. Only a checkpoint in the run's own dir is fully unpickled on resume: to continue "
            "a run you trust, give its dir as hydra.run.dir with trainer.resume=auto; to start from its weights, "
            f"use model.init.checkpoint={tag_dir}") from None
    if rng is not None:
        set_rng_state(rng)
    return client_state


def resume_target(resume: str, ckpt_root: Path) -> Path | None:
    """The tag dir `trainer.resume` (auto | none | a path) points at; None to start fresh. A damaged newest
    tag stops `auto` instead of silently resuming further back."""
    if resume == "auto":
        found = latest_checkpoint(ckpt_root)
        if found is None:
            return None
        earlier = [p for p in complete_checkpoints(ckpt_root)[:-1] if tag_problem(p) is None]
        back = f"resume from an earlier one with trainer.resume={earlier[-1]}" if earlier else "start afresh"
        return check_tag(found, f"trainer.resume=auto will not skip it: {back}, or move {found} away")
    if resume != "none":
        return resolve_checkpoint_dir(Path(resume))
    return None


def is_legacy_zero(tag_dir: Path | None) -> bool:
    """A one-process checkpoint from before ZeRO-1/2 ran as stage 0 on one process (its marker records no
    stage) may hold its optimizer state in ZeRO partition files: it must be resumed with the stage it used."""
    if tag_dir is None:
        return False
    try:
        marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    except ValueError:
        marker = {}
    return "zero_stage" not in marker and any(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))


def is_tag_dir(path: Path) -> bool:
    """A DeepSpeed tag dir (complete or not) rather than a run dir or checkpoints dir."""
    return (bool(TAG_PATTERN.fullmatch(path.name)) or (path / COMPLETE_MARKER).is_file()
            or any((path / name).is_file() for name in MODEL_STATES))


def resolve_checkpoint_dir(path: Path) -> Path:
    """Accept a run dir, its checkpoints/ dir or one tag dir; return the newest complete tag dir, checked whole
    (CheckpointError when it is incomplete or corrupt)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} is not a directory; pass a run dir of mmpt-train or one of "
                                f"its checkpoints/{TAG_PREFIX}* dirs")
    if is_tag_dir(path):
        return check_tag(path)
    roots = (path / "checkpoints", path)
    for root in roots:
        found = latest_checkpoint(root)
        if found is not None:
            return check_tag(found)
    partial = [p.name for root in roots for p in tag_dirs(root)]
    raise FileNotFoundError(
        f"no complete checkpoint in {path} (looked for {TAG_PREFIX}*/{COMPLETE_MARKER} in it and in its checkpoints/"
        + (f"; {', '.join(partial)} never finished saving" if partial else "")
        + "); pass a run dir of mmpt-train or one of its checkpoints/step_* dirs"
    )



def load_model_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 model state dict from a DeepSpeed tag (any ZeRO stage), without an engine.

    ZeRO partitions (and bf16 runs' fp32 masters) live in the *zero_pp_rank_*optim_states.pt files; stage 0
    in fp32 keeps the full module in mp_rank_00_model_states.pt. Frozen parameters (model.freeze, momentum
    teachers) are in no optimizer: zero_to_fp32 rebuilds them under ZeRO-2/3 but drops them under ZeRO-1, so
    they are taken from the module state dict (full replicas under stages 0-2), as fp32. ZeRO-3's module
    state dict holds empty placeholders for partitioned parameters; the consolidated weights replace them.

    Every file is read with the weights-only unpickler (mmpt.engine.safe_load): a downloaded checkpoint
    cannot run code here; one that needs more than tensors and DeepSpeed's records is refused.
    """
    from mmpt.engine.safe_load import load_tensors_file, refuse_unsafe_in

    model_file = next((tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file()), tag_dir / MODEL_STATES[0])
    state = load_tensors_file(model_file)
    module = {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    if not any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with refuse_unsafe_in(tag_dir, pattern="*_states.pt"):  # zero_to_fp32 passes weights_only=False; forced True
        weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {**{k: v for k, v in module.items() if k not in weights}, **weights}


# Plain state-dict files `model.init.checkpoint` accepts (read by mmpt.models.pretrained.read_state_dict).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def init_checkpoint_source(path: str | Path) -> Path:
    """`model.init.checkpoint` -> the newest complete tag dir of a run dir / checkpoints dir / tag dir, a
    Hugging Face CLIPModel directory, or a plain state-dict file. Checked before launch, so a typo fails in a
    second instead of after start-up."""
    from mmpt.interop.hf_clip import is_hf_clip_dir

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model.init.checkpoint={str(path)!r} does not exist; give an mmpt run dir, one of its "
            f"checkpoints/{TAG_PREFIX}* dirs, a Hugging Face CLIPModel dir, or a state-dict file "
            f"({', '.join(WEIGHT_SUFFIXES)})"
        )
    if p.is_dir():
        return p if is_hf_clip_dir(p) else resolve_checkpoint_dir(p)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"model.init.checkpoint={str(path)!r} is not a state-dict file ({', '.join(WEIGHT_SUFFIXES)})")
    return p


def read_init_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The whole-model state dict `model.init.checkpoint` names: consolidated fp32 weights of a DeepSpeed tag
    (frozen parameters and buffers included), or the tensors of a plain file or of a Hugging Face model
    directory, in their own naming (mmpt.models.pretrained.apply_init maps those through mmpt.interop)."""
    from mmpt.interop.hf_clip import is_hf_clip_dir
    from mmpt.models.pretrained import read_state_dict

    source = init_checkpoint_source(path)
    if source.is_dir() and not is_hf_clip_dir(source):
        return load_model_weights(source)
    return read_state_dict(source)
