"""What every visual tokenizer promises, its config, and the frozen-module base they share.

A visual tokenizer turns images into masked-image-modeling targets, one per patch. A model owns it as a
frozen submodule (so `.to(device)` and checkpoints carry it) and calls `encode` on the same images its
encoder sees: `b c h w`, normalised exactly as the data pipeline normalises them (data.mean / data.std).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn

KINDS = ("kmeans", "frozen", "pixels")


class VisualTokenizerError(ValueError):
    """A tokenizer file or config that cannot be used; the message says which file/key and how to fix it."""


@runtime_checkable
class VisualTokenizer(Protocol):
    """`encode(images b c h w) -> targets`: ids `b n` int64 for discrete tokenizers (kmeans, frozen),
    floats `b n (p p c)` for `pixels`; n = (h/p)*(w/p), patches in row-major order.

    `vocab_size` is the codebook size (0 for `pixels`); `target_dim` is what a prediction head must output
    per patch: vocab_size logits, or p*p*c regression values.
    """

    vocab_size: int
    patch_size: int
    target_dim: int

    @property
    def discrete(self) -> bool: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class VisualTokenizerConfig:
    """`kind`: kmeans | frozen (need `path`, a file written by `mmpt-data visual-tokenizer` or
    `save_frozen_tokenizer`) | pixels (no file: regression on per-patch normalised pixels).

    mean/std: how the images given to `encode` are normalised, i.e. the data's `data.mean`/`data.std`;
    None means "as recorded in the file" (kmeans/frozen) or CLIP's (pixels). patch_size/image_size: for
    `pixels` they define the targets (image_size None = any multiple of patch_size); for file kinds they
    are optional checks against the file, so a model config states what it expects and fails early.
    eps: stabiliser of the per-patch normalisation of `pixels` (kmeans records its own in the file).
    """

    kind: str = "pixels"
    path: str | None = None
    patch_size: int | None = None
    image_size: int | None = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    eps: float = 1e-2


class FrozenTokenizer(nn.Module):
    """Base of all tokenizers: no parameter ever requires grad and the module stays in eval mode even
    when its owner calls `.train()` (it is a fixed target generator, never trained with the model)."""

    def freeze_(self) -> FrozenTokenizer:
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FrozenTokenizer:
        return super().train(False)

    @property
    def discrete(self) -> bool:
        return self.vocab_size > 0  # type: ignore[attr-defined]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)  # type: ignore[attr-defined]


def check_images(images: torch.Tensor, patch_size: int, image_size: int | None, channels: int = 3) -> None:
    """Shape checks only (no host sync): `b c h w`, the expected channels and size, whole patches."""
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"visual tokenizer expects images `b {channels} h w`, got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if image_size is not None and (h != image_size or w != image_size):
        raise ValueError(
            f"visual tokenizer was built for {image_size}x{image_size} images, got {h}x{w}; set data.image_size "
            f"to {image_size} or fit/load a tokenizer for {h}x{w}"
        )
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer's patch_size={patch_size}")
