"""CLIP: a ViT and a text transformer trained with the image-text contrastive loss only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmpt.data.batch import Batch
from mmpt.models.cached_contrastive import CachedContrastive, grad_cache_capability
from mmpt.models.protocol import ModelOutput, check_kind
from mmpt.models.registry import register_arch
from mmpt.modules.encoders import text_tower_from, vision_tower_from
from mmpt.modules.heads import ProjectionHead, l2_normalize
from mmpt.modules.mlp import QuickGELU
from mmpt.models.config_parts import DualTowerConfig, build_contrastive_loss


@dataclass
class CLIPConfig(DualTowerConfig):
    """Defaults are the tiny CPU size (preset `tiny`); preset `base` is OpenAI CLIP ViT-B/16.

    text_causal: False = bidirectional text tower pooled at [CLS] (position 0; our tokenizer writes
    [CLS] ... [SEP]); True = causal tower pooled at the last real token ([SEP], CLIP's EOT), since under a
    causal mask [CLS] sees only itself. With right padding and one EOS per caption that is the token Hugging
    Face's CLIPTextModel pools (the first `eos_token_id`; legacy configs: the argmax id, OpenAI's EOT).

    quick_gelu: both towers' FFNs use x * sigmoid(1.702 x) instead of exact GELU (OpenAI CLIP's weights were
    trained with it). The OpenAI layout (presets `openai_b16`, `openai_tiny`) is quick_gelu + text_causal +
    vision.pre_norm + vision.patch_bias=false: it exports to and imports from Hugging Face's CLIPModel exactly
    (mmpt/interop/hf_clip.py) and loads open_clip state dicts (mmpt/interop/open_clip.py).
    """

    supported_objectives: ClassVar[tuple[str, ...]] = ("itc", "siglip")
    default_objectives: ClassVar[tuple[str, ...]] = ("itc",)

    arch_name: ClassVar[str] = "clip"
    text_causal: bool = False
    quick_gelu: bool = False


PRESETS: dict[str, dict[str, Any]] = {
    # 64 px / patch 8, 64 wide x 2 blocks per tower, 64-d ITC; temperature from 0.03 (0.07: t2i R@1 0.203 vs 0.274
    # on data no preset was tuned on), weights from std 0.05 (0.02: 0.192 / 0.263 vs 0.357 / 0.377 on the two seeds;
    # docs/RESULTS.md issue 11)
    "tiny": {"contrastive": {"temperature_init": 0.03}, "init_std": 0.05},
    # OpenAI CLIP ViT-B/16 shapes (149.6M parameters): 224 px, 12x768 ViT, 12x512 text, 512-d embedding
    "base": {
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {"width": 512, "layers": 12, "heads": 8, "vocab_size": 49408, "max_text_len": 77},
        "contrastive": {"embed_dim": 512},
    },
    # OpenAI CLIP ViT-B/16 as released (and as Hugging Face's CLIPModel / open_clip hold it): quick-GELU, ln_pre,
    # bias-free patch conv, causal text tower pooled at EOT. Shapes of `base`.
    "openai_b16": {
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12,
                   "pre_norm": True, "patch_bias": False},
        "text": {"width": 512, "layers": 12, "heads": 8, "vocab_size": 49408, "max_text_len": 77},
        "contrastive": {"embed_dim": 512},
        "text_causal": True, "quick_gelu": True,
    },
    # the openai_b16 layout at test size: 32 px / patch 8, 64-wide ViT and 32-wide text tower, 2 blocks each
    "openai_tiny": {
        "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2,
                   "pre_norm": True, "patch_bias": False},
        "text": {"width": 32, "layers": 2, "heads": 2},
        "contrastive": {"embed_dim": 32},
        "text_causal": True, "quick_gelu": True,
    },
}  # fmt: skip


class CLIP(CachedContrastive, nn.Module):
    """Dual encoder + ITC (or SigLIP's sigmoid loss: objectives=[siglip]); implements the `PretrainModel` protocol
    plus `grad_cache` (forward is exactly `contrastive_loss(*contrastive_features(batch), batch)`)."""

    objectives: tuple[str, ...] = ("itc",)
    data_kinds: tuple[str, ...] = ("pairs",)
    capabilities: frozenset[str] = frozenset({"grad_cache"})
    default_loss_weights = {"itc": 1.0, "siglip": 1.0}  # loss.weights.<name> overrides

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.objectives = tuple(cfg.objectives)
        self.capabilities = grad_cache_capability(self.objectives)
        act = QuickGELU if cfg.quick_gelu else nn.GELU
        self.visual = vision_tower_from(cfg.vision, act_layer=act, patch_dropout=cfg.patch_dropout)
        self.text = text_tower_from(cfg.text, causal=cfg.text_causal, act_layer=act)
        self.vision_proj = ProjectionHead(cfg.vision.width, cfg.contrastive.embed_dim)
        self.text_proj = ProjectionHead(cfg.text.width, cfg.contrastive.embed_dim)
        self.itc = build_contrastive_loss(cfg.contrastive, cfg.contrastive_objective())  # `itc`: the module's name either way

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `b c h w` -> L2-normalised `b e` from the [CLS] token."""
        return l2_normalize(self.vision_proj(self.visual(images)[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask `b l` (right-padded, 1 = real) -> L2-normalised `b e`."""
        tokens = self.text(input_ids, attention_mask)  # `b l d`
        if self.config.text_causal:
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0)  # index of the last real token
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
        else:
            pooled = tokens[:, 0]
        return l2_normalize(self.text_proj(pooled))

    def forward(self, batch: Batch) -> ModelOutput:
        return self.contrastive_loss(*self.contrastive_features(batch), batch)

    def flops_per_sample(self, kind: str = "pairs", batch_size: int = 1) -> float:
        """Training (forward + backward) FLOPs per image-text pair, for MFU.

        Sum over towers of 6 * (matmul weights) * tokens + 12 * layers * tokens^2 * width (attention
        scores and weights @ V), with tokens = 1 + (image_size/patch_size)^2 for the ViT (the kept patches with
        model.patch_dropout) and max_text_len
        for text (padding is computed too), plus 4 * patch-conv weights * patches (no input gradient for
        images) and 6 * weights for each projection head. Not counted: norms, softmax, GELU, the embedding lookup, and
        the ITC logits (12 * global_batch * embed_dim per pair: ~0.2% at ViT-B/16 with a 32k batch).
        """
        if not check_kind(kind, self.data_kinds):
            return 0.0
        return (
            self.visual.flops_per_sample()
            + self.text.flops_per_sample()
            + self.vision_proj.flops_per_sample()
            + self.text_proj.flops_per_sample()
        )


@register_arch("clip", CLIPConfig, PRESETS)
def build_clip(cfg: CLIPConfig) -> CLIP:
    return CLIP(cfg)
