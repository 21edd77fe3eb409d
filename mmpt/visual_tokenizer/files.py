"""Reading and writing tokenizer files, with one clear error for a missing, unreadable or wrong file.

Tensor files are safetensors when the package is installed (no pickle, mmap-able), else `torch.save`;
the reader recognises either by its first bytes, so a file written on one machine loads on another.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from mmpt.visual_tokenizer.base import VisualTokenizerError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container


def require_file(path: str | Path | None, kind: str) -> Path:
    """The tokenizer file of `kind`, or FileNotFoundError saying how to make one."""
    if not path:
        raise VisualTokenizerError(f"visual tokenizer kind={kind!r} needs `path` (a tokenizer file); got none")
    p = Path(path).expanduser()
    if not p.is_file():
        how = (
            "fit one with `mmpt-data visual-tokenizer --shards ... --codebook-size K --out FILE`"
            if kind == "kmeans" else "write one with mmpt.visual_tokenizer.save_frozen_tokenizer"
        )
        raise FileNotFoundError(f"visual tokenizer file not found: {p} (kind={kind!r}); {how}")
    return p


def sniff(path: Path) -> str:
    """'torch' (zip from torch.save), 'safetensors' (u64 header length then a JSON object) or 'unknown'."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:4] == ZIP_MAGIC:
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    return "unknown"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    """Write tensors + JSON-able metadata; returns the format used ('safetensors' or 'torch')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save({"tensors": tensors, "metadata": metadata}, path)
        return "torch"
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return "safetensors"


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors on CPU, metadata) from a file written by `save_tensors`."""
    fmt = sniff(path)
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        if fmt == "torch":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and set(obj) == {"tensors", "metadata"}:
                return dict(obj["tensors"]), dict(obj["metadata"])
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            hint = " (a frozen tokenizer file: set kind: frozen)" if keys == ["config", "state_dict"] else ""
            raise VisualTokenizerError(f"{path} holds {keys}, not a codebook written by save_tensors{hint}")
    except VisualTokenizerError:
        raise
    except ImportError as exc:
        raise VisualTokenizerError(f"{path} is a safetensors file; install safetensors to read it") from exc
    except (OSError, RuntimeError, ValueError, json.JSONDecodeError) as exc:
        raise VisualTokenizerError(f"cannot read visual tokenizer file {path}: {exc}") from exc
    raise VisualTokenizerError(f"{path} is neither a safetensors nor a torch.save file; is it a visual tokenizer?")
