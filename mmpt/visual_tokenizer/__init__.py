"""Visual tokenizers: frozen image -> per-patch target generators for masked image modeling.

Imports torch, einops and mmpt.modules only, so a model can own one (see base.py for the protocol).
"""
from mmpt.visual_tokenizer.base import (
    KINDS,
    FrozenTokenizer,
    VisualTokenizer,
    VisualTokenizerConfig,
    VisualTokenizerError,
)
from mmpt.visual_tokenizer.factory import build_visual_tokenizer
from mmpt.visual_tokenizer.frozen import (
    FrozenViTConfig,
    FrozenViTTokenizer,
    load_frozen_tokenizer,
    save_frozen_tokenizer,
)
from mmpt.visual_tokenizer.kmeans import KMeansResult, fit_kmeans
from mmpt.visual_tokenizer.kmeans_tokenizer import KMeansTokenizer, fit_kmeans_tokenizer
from mmpt.visual_tokenizer.pixels import PixelTokenizer

__all__ = [
    "KINDS", "FrozenTokenizer", "VisualTokenizer", "VisualTokenizerConfig", "VisualTokenizerError",
    "build_visual_tokenizer", "FrozenViTConfig", "FrozenViTTokenizer", "load_frozen_tokenizer",
    "save_frozen_tokenizer", "KMeansResult", "fit_kmeans", "KMeansTokenizer", "fit_kmeans_tokenizer",
    "PixelTokenizer",
]
