"""Checkpoints: DeepSpeed tags under <run dir>/checkpoints, a completeness marker, pruning, RNG state.

A checkpoint counts only once every rank has written its part and rank 0 has dropped the `complete`
marker, so a run killed mid-save resumes from the previous one instead of a half-written tag.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpt import distributed as mdist

COMPLETE_MARKER = "complete"
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag_dir: Path) -> int:
    return int(tag_dir.name[len(TAG_PREFIX):])


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete tag dirs, oldest first."""
    if not ckpt_root.is_dir():
        return []
    tags = [p for p in ckpt_root.glob(f"{TAG_PREFIX}*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=step_of)


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


def save(engine: Any, ckpt_root: Path, step: int, client_state: dict[str, Any], keep_last: int,
         extra_files: dict[str, str] | None = None) -> Path:
    """Collective: every rank must call it. Writes the tag, per-rank RNG, the marker, then prunes."""
    tag = tag_for(step)
    # Frozen parameters (model.freeze, momentum teachers) are not in the optimizer: only the module state dict
    # carries them, so they must never be excluded from it.
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, exclude_frozen_parameters=False)
    tag_dir = ckpt_root / tag
    torch.save(rng_state(), tag_dir / f"rng_rank{mdist.rank():05d}.pt")
    mdist.barrier()
    if mdist.rank() == 0:
        for name, text in (extra_files or {}).items():
            (tag_dir / name).write_text(text)
        marker = {"step": step, "world_size": mdist.world_size(), "zero_stage": engine.zero_optimization_stage()}
        (tag_dir / COMPLETE_MARKER).write_text(json.dumps(marker))
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    mdist.barrier()
    return tag_dir


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
                raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
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
    """The tag dir `trainer.resume` (auto | none | a path) points at; None to start fresh."""
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
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


def resolve_checkpoint_dir(path: Path) -> Path:
    """Accept a run dir, its checkpoints/ dir or one tag dir; return the newest complete tag dir."""
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no complete checkpoint in {path} (looked for {TAG_PREFIX}*/{COMPLETE_MARKER} in it and in its checkpoints/); "
        "pass a run dir of mmpt-train or one of its checkpoints/step_* dirs"
    )


MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3


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
