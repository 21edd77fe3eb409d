"""mmpt: distributed multimodal (image-text) pretraining.

`mmpt.load(PATH, device="cpu", dtype=None)` loads a trained model for inference (see mmpt/api.py).
"""
from __future__ import annotations

from typing import Any

from mmpt.torch_extensions import default_torch_extensions_dir

default_torch_extensions_dir()  # DeepSpeed's JIT ops cached per venv; before anything imports deepspeed

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `import mmpt` stays cheap for the CLIs, `mmpt.load` pulls in torch and the models on first use
    if name == "load":
        from mmpt.api import load

        return load
    raise AttributeError(f"module 'mmpt' has no attribute {name!r}")
