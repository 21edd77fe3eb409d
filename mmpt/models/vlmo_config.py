"""VLMo's configuration: the structured `model.*` schema (validated before launch) and the paper presets.

Backbone sizes come from mmpt/modules/multiway_presets.py (one place says what "VLMo-Base" means); this file
adds the objective settings and the optional masked-image-modeling tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from mmpt.models.config_base import ModelConfigBase
from mmpt.models.config_checks import itc_mlm_problems
from mmpt.modules.multiway_presets import vlmo_base_dims, vlmo_large_dims
from mmpt.visual_tokenizer import KINDS as TOKENIZER_KINDS
from mmpt.visual_tokenizer import VisualTokenizerConfig

# Config fields that are `MultiwayEncoder` keyword arguments, passed through unchanged.
ENCODER_KEYS = ("width", "layers", "heads", "mlp_ratio", "vl_layers", "image_size", "patch_size", "vocab_size",
                "max_text_len", "type_embed", "text_embed_norm", "layer_scale", "norm_eps", "dropout")


@dataclass
class VLMoConfig(ModelConfigBase):
    """Defaults are the tiny CPU size (64 wide, 2 blocks, VL-FFN in the top 1, 64 px / patch 8, 24 tokens),
    without VLMo's text-embedding LayerNorm and layer scales (a tiny model trained from scratch stalls ITC
    with them, see conf/model/vlmo/tiny.yaml); `vlmo_base_config` / `vlmo_large_config` are the paper's.

    mim_tokenizer: the frozen visual tokenizer of masked image modeling (image-only data, stage 1); None
    builds no MIM head, so a text or pairs stage carries no unused head (image-only batches are then an
    error). Its patch_size / image_size default to the model's, so a tokenizer file made for another
    geometry fails at build time. embed_dim: ITC projection width (VLMo projects to the hidden width).
    """

    arch: str = "vlmo"
    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    vl_layers: int = 1
    vocab_size: int = 1000
    max_text_len: int = 24
    type_embed: bool = True  # modality-type embedding (VLMo)
    text_embed_norm: bool = False  # BERT's LayerNorm on the text embedding sum (VLMo: True)
    layer_scale: Optional[float] = None  # per-channel residual scales (VLMo: 0.1)
    norm_eps: float = 1e-6
    dropout: float = 0.0
    embed_dim: int = 64
    temperature_init: float = 0.07
    min_temperature: float = 0.01  # logit scale <= 100 (CLIP's clamp)
    max_temperature: float = 1.0
    mlm_prob: float = 0.15
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4
    itm_hardness_warmup_steps: int = 0  # hard negatives sharpen from uniform to softmax(sim) over these steps
    itm_global_negatives: bool = True  # False: hard negatives from the local batch only (no gather)
    mim_tokenizer: Optional[VisualTokenizerConfig] = None

    def __post_init__(self) -> None:
        if isinstance(self.mim_tokenizer, dict):  # VLMoConfig(mim_tokenizer={...}) in code
            self.mim_tokenizer = VisualTokenizerConfig(**self.mim_tokenizer)
        p: list[str] = []
        if self.image_size % self.patch_size:
            p.append(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.width % self.heads:
            p.append(f"width={self.width} must be divisible by heads={self.heads}")
        if not 1 <= self.vl_layers <= self.layers:
            p.append(f"vl_layers={self.vl_layers} must be in [1, layers={self.layers}] (ITM/MLM need a VL-FFN)")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout} must be in [0, 1)")
        p += itc_mlm_problems(self)
        tok = self.mim_tokenizer
        if tok is not None:
            if tok.kind not in TOKENIZER_KINDS:
                p.append(f"mim_tokenizer.kind={tok.kind!r} must be one of {list(TOKENIZER_KINDS)}")
            elif tok.kind != "pixels" and not tok.path:
                p.append(
                    f"mim_tokenizer.kind={tok.kind} needs mim_tokenizer.path (fit one with `mmpt-data "
                    "visual-tokenizer --shards ... --codebook-size K --out FILE`), or use kind=pixels"
                )
            for key in ("patch_size", "image_size"):
                want, have = getattr(self, key), getattr(tok, key)
                if have is not None and have != want:
                    p.append(f"mim_tokenizer.{key}={have} differs from model.{key}={want}; leave it unset")
            self.mim_tokenizer = replace(tok, patch_size=self.patch_size, image_size=self.image_size)
        if p:
            raise ValueError("invalid VLMo config: " + "; ".join(p))

    def encoder_kwargs(self) -> dict[str, Any]:
        """The `MultiwayEncoder` arguments (shared attention, VLMo's layout)."""
        return {key: getattr(self, key) for key in ENCODER_KEYS}


def _preset(dims: dict[str, Any], overrides: dict[str, Any]) -> VLMoConfig:
    names = {f.name for f in fields(VLMoConfig)}
    unknown = sorted(set(dims) - names)
    if unknown:  # a preset key this config cannot express would silently change the size
        raise ValueError(f"preset keys {unknown} have no VLMoConfig field")
    return VLMoConfig(**{**dims, "embed_dim": dims["width"], **overrides})


def vlmo_base_config(**overrides: Any) -> VLMoConfig:
    """VLMo-Base/16: 768 wide, 12 blocks, VL-FFN in the top 2, 224 px, BERT vocab, 40 tokens, 768-d ITC."""
    return _preset(vlmo_base_dims(), overrides)


def vlmo_large_config(**overrides: Any) -> VLMoConfig:
    """VLMo-Large/16: 1024 wide, 24 blocks, 16 heads, VL-FFN in the top 3, 1024-d ITC."""
    return _preset(vlmo_large_dims(), overrides)
