"""ALBEF's configuration: the structured `model.*` schema (validated before launch) and the base preset."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mmpt.models.momentum import MomentumConfig
from mmpt.models.config_base import ModelConfigBase
from mmpt.models.config_checks import itc_mlm_problems, tower_problems


def _albef_momentum() -> MomentumConfig:
    return MomentumConfig(enabled=True, momentum=0.995, queue_size=65536, alpha=0.4)


@dataclass
class ALBEFConfig(ModelConfigBase):
    """Defaults are a tiny CPU size with ALBEF's objective settings; `albef_base_config` is the paper's.

    text_layers are text-only (ITC reads their [CLS]); fusion_layers add cross-attention to the image tokens
    (ITM, MLM). Temperature is learnable from temperature_init and clamped to [min, max]_temperature.
    Special token ids are never masked for MLM (pad, cls, sep) or are the mask itself.
    """

    arch: str = "albef"
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_width: int = 64
    text_layers: int = 1
    fusion_layers: int = 1
    text_heads: int = 2
    vocab_size: int = 1000
    max_text_len: int = 32
    embed_dim: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    temperature_init: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    mlm_prob: float = 0.15
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4
    text_norm_first: bool = True  # False: BERT's post-LN layout, required to load BERT weights (model.init.text)
    text_norm_eps: float = 1e-5  # BERT uses 1e-12
    itm_hardness_warmup_steps: int = 0  # hard negatives sharpen from uniform to softmax(sim) over these steps
    itm_global_negatives: bool = True  # False: ALBEF's local-batch hard negatives (no gather)
    # False: ITM and MLM train the fusion layers and heads only; the unimodal encoders learn from ITC alone
    fusion_grads_to_encoders: bool = True
    momentum: MomentumConfig = field(default_factory=_albef_momentum)

    def __post_init__(self) -> None:
        if isinstance(self.momentum, dict):  # ALBEFConfig(momentum={...}) in code: overrides of ALBEF's defaults
            self.momentum = replace(_albef_momentum(), **self.momentum)
        p: list[str] = tower_problems(self)
        if self.text_layers < 0 or self.fusion_layers < 1:
            p.append(f"need text_layers >= 0 and fusion_layers >= 1 (ITM/MLM), got {self.text_layers}, {self.fusion_layers}")
        p += itc_mlm_problems(self)
        m = self.momentum
        if not 0.0 <= m.momentum <= 1.0:
            p.append(f"momentum.momentum={m.momentum} must be in [0, 1]")
        if m.queue_size <= 0:
            p.append(f"momentum.queue_size={m.queue_size} must be positive (a multiple of the global batch)")
        if not 0.0 <= m.alpha <= 1.0 or m.alpha_warmup_steps < 0:
            p.append(f"need momentum.alpha in [0, 1] and alpha_warmup_steps >= 0, got {m.alpha}, {m.alpha_warmup_steps}")
        if p:
            raise ValueError("invalid ALBEF config: " + "; ".join(p))


def albef_base_config(**overrides: Any) -> ALBEFConfig:
    """ALBEF-base: ViT-B/16 at 256 px, BERT-base split 6 text + 6 fusion layers, 256-d ITC, queue 65536."""
    base: dict[str, Any] = dict(
        image_size=256, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12, text_width=768,
        text_layers=6, fusion_layers=6, text_heads=12, vocab_size=30522, max_text_len=30, embed_dim=256,
        text_norm_first=False, text_norm_eps=1e-12,  # BERT's layout, so BERT-base weights load (model.init.text)
        # alpha ramps over ~one epoch of ALBEF-4M (5.1M pairs) at global batch 512, as the paper does
        momentum=MomentumConfig(enabled=True, momentum=0.995, queue_size=65536, alpha=0.4, alpha_warmup_steps=10000),
    )  # fmt: skip
    base.update(overrides)
    return ALBEFConfig(**base)
