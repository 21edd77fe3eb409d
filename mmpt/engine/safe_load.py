"""Reading checkpoint files without running code from them: `torch.load(weights_only=True)` everywhere.

A checkpoint downloaded from the internet is a pickle, and a pickle can call any function while it loads. Weights
for evaluation, `mmpt.load`, `mmpt-export`, `model.init.checkpoint` and a resume from a path outside the run's own
dir are therefore read with torch's weights-only unpickler, which builds tensors, containers and numbers and
refuses every other global. What DeepSpeed (0.19) and mmpt put into a checkpoint, measured for ZeRO 0-3,
fp32 and bf16, on one and two processes:

- `*model_states.pt`: tensors and plain Python values only (nothing to allow);
- `*zero_pp_rank_*optim_states.pt`: also `LossScaler`, `ZeroStageEnum` and `fragment_address` (plain records:
  an int enum, a dataclass of two ints, an object whose attributes are numbers; none runs code when built);
- `rng_rank*.pt` (resume only): numpy's RNG state, an `ndarray` (numpy's `_reconstruct`, `ndarray`, `dtype`).

Those types (and `DynamicLossScaler`, fp16's sibling of `LossScaler`) are the whole allow-list. DeepSpeed's
own readers (`zero_to_fp32`, `engine.load_checkpoint`) pass `weights_only=False`; inside `weights_only_loads()`
torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that, so they get the same restricted unpickler.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmpt.engine.config import ConfigError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # would contradict FORCE_ENV (torch refuses both set)


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file holds objects that only a full (code-running) unpickle could build."""


def deepspeed_safe_globals() -> list[Callable[..., Any]]:
    """The non-tensor types DeepSpeed writes into ZeRO optimizer-state files (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def numpy_rng_safe_globals() -> list[Callable[..., Any]]:
    """numpy's pickled RNG state (`np.random.get_state()` holds a uint32 ndarray), written by mmpt's resume files."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # BUILD of a dtype needs its class


def _require_safe_globals_api() -> None:
    if not hasattr(torch.serialization, "safe_globals"):
        raise ConfigError(f"reading checkpoints without unpickling code needs torch>=2.5 (found {torch.__version__}); "
                          "upgrade torch")


def unsafe_globals(file: Path, allowed: list[Callable[..., Any]]) -> list[str]:
    """The globals a torch zip checkpoint references beyond `allowed`, read without unpickling (for messages)."""
    allowed_names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception:  # noqa: BLE001 - a corrupt or non-zip file: nothing to list, the load error says more
        return []
    return sorted(set(found) - allowed_names)


REFUSED_TYPE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


def refusal(what: Path, files: list[Path], allowed: list[Callable[..., Any]], exc: BaseException) -> UnsafeCheckpointError:
    """One clear message: which file(s), which types, why, and how to proceed."""
    found = {f: names for f in files if (names := unsafe_globals(f, allowed))}
    if not found:  # a type torch refuses to build that the scan cannot see (no GLOBAL of its own)
        found = {what: [a or b for a, b in REFUSED_TYPE.findall(str(exc))] or ["types other than tensors"]}
    where = "; ".join(f"{f} holds objects of {', '.join(names[:6])}" for f, names in found.items())
    return UnsafeCheckpointError(
        f"{where}; mmpt reads checkpoints with torch.load(weights_only=True) and never unpickles other "
        "objects, since a checkpoint from elsewhere could run code while it loads. If you trust its origin, convert it "
        "yourself to weights only (torch.save(torch.load(FILE, weights_only=False)['module'], 'weights.pt'), or "
        "DeepSpeed's zero_to_fp32.py) and pass that file"
    )


@contextmanager
def weights_only_loads(allowed: list[Callable[..., Any]]) -> Iterator[None]:
    """Every `torch.load` inside, DeepSpeed's included, uses the weights-only unpickler with `allowed` types
    added. Not thread-safe (it sets an environment variable): readers call it from the main thread, before
    training starts."""
    _require_safe_globals_api()
    saved = {key: os.environ.get(key) for key in (FORCE_ENV, NO_FORCE_ENV)}
    os.environ[FORCE_ENV] = "1"
    os.environ.pop(NO_FORCE_ENV, None)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_tensors_file(file: Path) -> Any:
    """`torch.load(file, weights_only=True)` on the CPU (tensors, containers, numbers: what a model-states file
    holds); an UnsafeCheckpointError (exit 2 in the CLIs) instead of unpickling anything else."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refusal(file, [file], [], exc) from None


@contextmanager
def refuse_unsafe_in(tag_dir: Path, extra_globals: list[Callable[..., Any]] = (), pattern: str = "*.pt") -> Iterator[None]:
    """`weights_only_loads()` with DeepSpeed's record types (and `extra_globals`) allowed, around a reader of
    a whole tag dir (DeepSpeed's own): a refusal names the dir, and the files matching `pattern` (those the
    reader opens) with the types they need."""
    allowed = [*deepspeed_safe_globals(), *extra_globals]
    with weights_only_loads(allowed):
        try:
            yield
        except pickle.UnpicklingError as exc:
            raise refusal(tag_dir, sorted(tag_dir.glob(pattern)), allowed, exc) from None
