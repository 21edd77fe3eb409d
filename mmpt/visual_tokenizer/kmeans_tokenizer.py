"""The k-means visual tokenizer: a codebook of per-patch normalised pixel patches, fitted offline.

Why this is a tokenizer at all: BEiT-style MIM needs discrete targets, and a learned VQ tokenizer
(DALL-E dVAE, BEiT v2 VQ-KD) needs its own pretraining run. Clustering normalised patches gives targets
for free: after removing each patch's brightness and contrast (`normalized_patches`) the nearest centre
says which shape/texture the patch shows (edge orientation, corner, stripe, flat), which is what a masked
patch should be inferred from; raw pixels would instead spend most codes on colour and brightness levels,
which dominate Euclidean distance.

File (`save`, one tensor file, see files.py): tensor `codebook` `k (p p c)` float32 and metadata
{format, version, kind: "kmeans", patch_size, image_size, channels, eps, mean, std, feature}. mean/std
record how the fitting images were normalised; they are the default for `encode`'s input.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange

from mmpt.visual_tokenizer.base import FrozenTokenizer, VisualTokenizerError, check_images
from mmpt.visual_tokenizer.files import load_tensors, save_tensors
from mmpt.visual_tokenizer.kmeans import KMeansResult, Progress, assign, fit_kmeans
from mmpt.visual_tokenizer.patches import channel_stats, normalized_patches, unnormalize

FORMAT = "mmpt-visual-tokenizer"
VERSION = 1
FEATURE = "per-patch normalised [0,1] RGB pixels, (p1 p2 c) order, (x - mean) / (std + eps)"


class KMeansTokenizer(FrozenTokenizer):
    """Images `b c h w` (data-normalised with mean/std) -> ids `b n` of the nearest codebook entry."""

    def __init__(
        self,
        codebook: torch.Tensor,
        patch_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        eps: float,
    ) -> None:
        super().__init__()
        k, dim = codebook.shape
        if dim != patch_size * patch_size * 3:
            raise VisualTokenizerError(
                f"codebook entries have {dim} values, expected patch_size^2 * 3 = {patch_size**2 * 3}"
            )
        self.vocab_size = self.target_dim = k
        self.patch_size, self.image_size, self.eps = patch_size, image_size, eps
        self.mean_values, self.std_values = [float(v) for v in mean], [float(v) for v in std]
        self.register_buffer("codebook", torch.empty(k, dim))  # `k (p p c)`; on the meta device when built there
        self.codebook.copy_(codebook)
        self.register_buffer("mean", channel_stats(mean, "mean"), persistent=False)
        self.register_buffer("std", channel_stats(std, "std"), persistent=False)
        self.freeze_()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """`b c h w` -> `b n (p p c)`: the points the codebook was fitted on."""
        check_images(images, self.patch_size, self.image_size)
        return normalized_patches(unnormalize(images, self.mean, self.std), self.patch_size, self.eps)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.features(images)
        ids, _ = assign(rearrange(feats, "b n d -> (b n) d"), self.codebook.float())
        return rearrange(ids, "(b n) -> b n", b=images.shape[0])

    def metadata(self) -> dict[str, object]:
        return {
            "format": FORMAT, "version": VERSION, "kind": "kmeans", "patch_size": self.patch_size,
            "image_size": self.image_size, "channels": 3, "eps": self.eps, "feature": FEATURE,
            "mean": self.mean_values, "std": self.std_values,
        }  # fmt: skip

    def save(self, path: str | Path) -> str:
        """Write the codebook file; returns the format used ('safetensors' or 'torch')."""
        return save_tensors(path, {"codebook": self.codebook}, self.metadata())

    @classmethod
    def load(
        cls, path: Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> KMeansTokenizer:
        """From a file written by `save`; mean/std (the data's normalisation) default to the file's."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT or meta.get("kind") != "kmeans" or "codebook" not in tensors:
            found = meta.get("kind", "no mmpt tokenizer metadata")
            raise VisualTokenizerError(
                f"{path} is not a k-means codebook (found: {found}); write one with `mmpt-data visual-tokenizer`"
            )
        if meta.get("version") != VERSION:
            raise VisualTokenizerError(
                f"{path} has codebook format version {meta.get('version')}, this mmpt reads {VERSION}"
            )
        return cls(
            tensors["codebook"], int(meta["patch_size"]), int(meta["image_size"]),
            meta["mean"] if mean is None else mean, meta["std"] if std is None else std, float(meta["eps"]),
        )  # fmt: skip


def fit_kmeans_tokenizer(
    images: torch.Tensor,
    codebook_size: int,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float = 1e-2,
    iters: int = 20,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[KMeansTokenizer, KMeansResult]:
    """Fit a codebook on all patches of `images` `b c h w` (square, data-normalised with mean/std).

    Features are computed on the images' device, a chunk of images at a time (no full-size copy of the
    un-normalised images); a GPU makes the fit much faster but changes the result at the float-rounding level.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images `b c s s`, got shape {tuple(images.shape)}")
    tok = KMeansTokenizer(
        torch.zeros(codebook_size, patch_size * patch_size * 3), patch_size, images.shape[-1], mean, std, eps
    ).to(images.device)
    feats = torch.cat([rearrange(tok.features(chunk), "b n d -> (b n) d") for chunk in images.split(256)])
    result = fit_kmeans(feats, codebook_size, iters=iters, seed=seed, progress=progress)
    tok.codebook.copy_(result.centres)
    return tok, result
