"""CLIP: a ViT and a text transformer trained with the image-text contrastive loss only."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmpt.data.batch import Batch
from mmpt.models.protocol import ModelOutput
from mmpt.models.registry import register_arch
from mmpt.modules.block import no_weight_decay_names
from mmpt.modules.encoders import TextTransformer, vision_tower_from
from mmpt.modules.heads import ProjectionHead, l2_normalize
from mmpt.objectives.itc import ContrastiveLoss
from mmpt.models.config_base import ModelConfigBase
from mmpt.models.config_checks import tower_problems
from mmpt.objectives.pair_codes import itc_codes


@dataclass
class CLIPConfig(ModelConfigBase):
    """Defaults are the tiny CPU test size; see `vit_b16_config` / conf/model/clip/base.yaml for ViT-B/16.

    text_causal: False = bidirectional text tower pooled at [CLS] (position 0; our tokenizer writes
    [CLS] ... [SEP]); True = causal tower pooled at the last real token ([SEP], CLIP's EOT), since under a
    causal mask [CLS] sees only itself.
    """

    arch: str = "clip"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    vocab_size: int = 1000
    max_text_len: int = 32
    embed_dim: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0
    text_causal: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = tower_problems(self)
        if self.temperature_init <= 0 or 1.0 / self.temperature_init > self.max_logit_scale:
            problems.append(
                f"temperature_init={self.temperature_init} must be > 0 and >= 1/max_logit_scale={1.0 / self.max_logit_scale}"
            )
        if problems:
            raise ValueError("invalid CLIP config: " + "; ".join(problems))


def vit_b16_config(**overrides: object) -> CLIPConfig:
    """OpenAI CLIP ViT-B/16 shapes (149.6M parameters): 224 px, 12x768 ViT, 12x512 text, 512-d embedding."""
    base: dict[str, object] = dict(
        image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
        text_width=512, text_layers=12, text_heads=8, vocab_size=49408, max_text_len=77, embed_dim=512,
    )  # fmt: skip
    base.update(overrides)
    return CLIPConfig(**base)  # type: ignore[arg-type]


class CLIP(nn.Module):
    """Dual encoder + ITC; implements the `PretrainModel` protocol."""

    objectives: tuple[str, ...] = ("itc",)
    default_loss_weights = {"itc": 1.0}  # loss.weights.<name> overrides

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = vision_tower_from(cfg)
        self.text = TextTransformer(
            cfg.vocab_size, cfg.max_text_len, cfg.text_width, cfg.text_layers, cfg.text_heads,
            mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, attn_dropout=cfg.dropout, causal=cfg.text_causal,
        )  # fmt: skip
        self.vision_proj = ProjectionHead(cfg.vision_width, cfg.embed_dim)
        self.text_proj = ProjectionHead(cfg.text_width, cfg.embed_dim)
        self.itc = ContrastiveLoss(cfg.temperature_init, cfg.max_logit_scale)

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
        image_features = self.encode_image(batch.images)
        text_features = self.encode_text(batch.input_ids, batch.attention_mask)
        loss, metrics = self.itc(image_features, text_features, itc_codes(
            self.config.itc_duplicate_positives, batch.image_ids, batch.input_ids, batch.attention_mask))
        return ModelOutput(losses={"itc": loss}, metrics=metrics)

    def flops_per_sample(self) -> float:
        """Training (forward + backward) FLOPs per image-text pair, for MFU.

        Sum over towers of 6 * (matmul weights) * tokens + 12 * layers * tokens^2 * width (attention
        scores and weights @ V), with tokens = 1 + (image_size/patch_size)^2 for the ViT and max_text_len
        for text (padding is computed too), plus 4 * patch-conv weights * patches (no input gradient for
        images) and 6 * weights for each projection head. Not counted: norms, softmax, GELU, the embedding lookup, and
        the ITC logits (12 * global_batch * embed_dim per pair: ~0.2% at ViT-B/16 with a 32k batch).
        """
        return (
            self.visual.flops_per_sample()
            + self.text.flops_per_sample()
            + self.vision_proj.flops_per_sample()
            + self.text_proj.flops_per_sample()
        )

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names exempt from weight decay: every ndim < 2 tensor (LayerNorm weights, biases,
        `itc.logit_scale`) and anything named `pos_embed` / `cls_token` (see `mmpt.modules.block`)."""
        return no_weight_decay_names(self)


@register_arch("clip", CLIPConfig)
def build_clip(cfg: CLIPConfig) -> CLIP:
    return CLIP(cfg)
