"""A frozen learned tokenizer (VQ-KD style, BEiT v2) loaded from a local checkpoint.

Inference as in VQ-KD: ViT patch features -> task layer (Linear, Tanh, Linear to the code dim) ->
L2-normalise -> the codebook entry of highest cosine similarity (entries L2-normalised too). Training such
a tokenizer (distilling a teacher's features through the codebook) is out of scope: mmpt only runs it.

Checkpoint file (`save_frozen_tokenizer`; torch.save, read with weights_only=True):
    {"config": {image_size, patch_size, width, layers, heads, codebook_size, code_dim,
                [mlp_ratio=4.0, cls_token=True, norm_eps=1e-5, mean=CLIP, std=CLIP]},
     "state_dict": {"encoder.*": mmpt VisionTransformer weights, "task_layer.{0,2}.{weight,bias}",
                    "codebook": `codebook_size code_dim`}}
config.mean/std is the normalisation the encoder was trained with; the images given to `encode` may be
normalised differently (the data's mean/std), they are re-normalised on the way in.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmpt.modules.block import init_weights_
from mmpt.modules.encoders import VisionTransformer
from mmpt.visual_tokenizer.base import FrozenTokenizer, VisualTokenizerError, check_images
from mmpt.visual_tokenizer.files import sniff
from mmpt.visual_tokenizer.kmeans import assign
from mmpt.visual_tokenizer.patches import CLIP_MEAN, CLIP_STD, channel_stats, unnormalize


@dataclass
class FrozenViTConfig:
    """Dimensions of the tokenizer's ViT and codebook; mean/std = the encoder's input normalisation."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    codebook_size: int
    code_dim: int
    mlp_ratio: float = 4.0
    cls_token: bool = True
    norm_eps: float = 1e-5
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))


class FrozenViTTokenizer(FrozenTokenizer):
    """Images `b c h w` (data-normalised with input_mean/input_std) -> ids `b n` (codebook by cosine)."""

    def __init__(
        self,
        config: FrozenViTConfig,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        c = self.config = config
        self.vocab_size = self.target_dim = c.codebook_size
        self.patch_size, self.image_size = c.patch_size, c.image_size
        self.encoder = VisionTransformer(
            c.image_size, c.patch_size, c.width, c.layers, c.heads, mlp_ratio=c.mlp_ratio, cls_token=c.cls_token,
            norm_eps=c.norm_eps,
        )  # fmt: skip
        self.task_layer = nn.Sequential(nn.Linear(c.width, c.width), nn.Tanh(), nn.Linear(c.width, c.code_dim))
        init_weights_(self.task_layer)
        self.register_buffer("codebook", F.normalize(torch.randn(c.codebook_size, c.code_dim), dim=-1))
        in_mean = list(c.mean) if input_mean is None else [float(v) for v in input_mean]
        in_std = list(c.std) if input_std is None else [float(v) for v in input_std]
        self.renormalize = (in_mean, in_std) != (list(c.mean), list(c.std))  # host floats: decided once, here
        self.register_buffer("in_mean", channel_stats(in_mean, "mean"), persistent=False)
        self.register_buffer("in_std", channel_stats(in_std, "std"), persistent=False)
        self.register_buffer("enc_mean", channel_stats(c.mean, "mean"), persistent=False)
        self.register_buffer("enc_std", channel_stats(c.std, "std"), persistent=False)
        self.freeze_()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.patch_size, self.image_size)
        x = images
        if self.renormalize:
            x = (unnormalize(images, self.in_mean, self.in_std) - self.enc_mean) / self.enc_std
        tokens = self.encoder(x.to(self.encoder.patch_embed.proj.weight.dtype))  # `b (1 + n) d` or `b n d`
        if self.config.cls_token:
            tokens = tokens[:, 1:]
        z = F.normalize(self.task_layer(tokens).float(), dim=-1)  # `b n c`
        # on unit vectors the nearest entry in Euclidean distance is the one of highest cosine similarity
        ids, _ = assign(rearrange(z, "b n c -> (b n) c"), F.normalize(self.codebook.float(), dim=-1))
        return rearrange(ids, "(b n) -> b n", b=images.shape[0])


def save_frozen_tokenizer(tokenizer: FrozenViTTokenizer, path: str | Path) -> None:
    """Write `{"config": ..., "state_dict": ...}` (the format in this module's docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    torch.save({"config": dataclasses.asdict(tokenizer.config), "state_dict": state}, path)


def load_frozen_tokenizer(
    path: Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> FrozenViTTokenizer:
    """Read a checkpoint; mean/std = how `encode`'s input is normalised (default: the encoder's own)."""
    if sniff(path) == "safetensors":
        raise VisualTokenizerError(
            f"{path} is a safetensors file, not a frozen tokenizer checkpoint; a k-means codebook needs kind: kmeans"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...: all mean "not this format"
        raise VisualTokenizerError(
            f"cannot read frozen tokenizer {path}: {type(exc).__name__}: {exc}; expected a torch.save file of "
            '{"config": {...}, "state_dict": {...}} (a k-means codebook needs kind: kmeans)'
        ) from exc
    if not isinstance(obj, dict) or set(obj) != {"config", "state_dict"}:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise VisualTokenizerError(f"{path} must hold exactly {{'config', 'state_dict'}}, found {found}")
    fields = {f.name for f in dataclasses.fields(FrozenViTConfig)}
    required = {f.name for f in dataclasses.fields(FrozenViTConfig) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}  # fmt: skip
    given = set(obj["config"])
    if given - fields or required - given:
        raise VisualTokenizerError(
            f"{path}: config has unknown keys {sorted(given - fields)} and lacks required keys "
            f"{sorted(required - given)}; "
            f"allowed: {sorted(fields)}"
        )
    tokenizer = FrozenViTTokenizer(FrozenViTConfig(**obj["config"]), mean, std)
    try:
        with warnings.catch_warnings():  # built on the meta device (config validation): key/shape checks only
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            missing, unexpected = tokenizer.load_state_dict(obj["state_dict"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise VisualTokenizerError(f"{path}: state_dict does not match its config: {exc}") from exc
    if missing or unexpected:
        raise VisualTokenizerError(
            f"{path}: state_dict does not match its config: missing keys {missing}, unexpected keys {unexpected}"
        )
    return tokenizer.freeze_()
