"""mmpt: distributed multimodal (image-text) pretraining."""
from mmpt.torch_extensions import default_torch_extensions_dir

default_torch_extensions_dir()  # DeepSpeed's JIT ops cached per venv; before anything imports deepspeed

__version__ = "0.1.0"
