"""`build_visual_tokenizer(cfg)`: the one place that turns a `VisualTokenizerConfig` into a tokenizer."""
from __future__ import annotations

from typing import Any

from mmpt.visual_tokenizer.base import KINDS, FrozenTokenizer, VisualTokenizerConfig, VisualTokenizerError
from mmpt.visual_tokenizer.files import require_file
from mmpt.visual_tokenizer.frozen import load_frozen_tokenizer
from mmpt.visual_tokenizer.kmeans_tokenizer import KMeansTokenizer
from mmpt.visual_tokenizer.patches import CLIP_MEAN, CLIP_STD
from mmpt.visual_tokenizer.pixels import PixelTokenizer


def build_visual_tokenizer(cfg: VisualTokenizerConfig | Any) -> FrozenTokenizer:
    """A frozen tokenizer on CPU (`.to(device)` it with its owner). `cfg` may be the dataclass or any object
    with its fields (a DictConfig). A missing file is FileNotFoundError; any other unusable file or setting is
    VisualTokenizerError, both naming the file/key and the fix."""
    kind = cfg.kind
    if kind not in KINDS:
        raise VisualTokenizerError(f"visual tokenizer kind={kind!r} is not one of {list(KINDS)}")
    mean = None if cfg.mean is None else list(cfg.mean)
    std = None if cfg.std is None else list(cfg.std)
    if kind == "pixels":
        if cfg.patch_size is None:
            raise VisualTokenizerError("visual tokenizer kind='pixels' needs patch_size (the model's patch size)")
        return PixelTokenizer(cfg.patch_size, cfg.image_size, mean or CLIP_MEAN, std or CLIP_STD, cfg.eps)
    path = require_file(cfg.path, kind)
    tokenizer: FrozenTokenizer = (
        KMeansTokenizer.load(path, mean, std) if kind == "kmeans" else load_frozen_tokenizer(path, mean, std)
    )
    for key in ("patch_size", "image_size"):
        want, have = getattr(cfg, key), getattr(tokenizer, key)
        if want is not None and want != have:
            raise VisualTokenizerError(
                f"visual tokenizer {path} has {key}={have} but the config asks for {key}={want}; "
                f"use a tokenizer made for {key}={want} or change the model's {key}"
            )
    return tokenizer
