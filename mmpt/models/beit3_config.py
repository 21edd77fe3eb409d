"""BEiT-3's configuration: the structured `model.*` schema (validated before launch) and the size presets.

Backbone dimensions come from mmpt/modules/multiway_presets.py (one place says what "BEiT-3 base" means);
this file adds what the model puts on top: which loss terms it trains, the masking ratios of masked data
modeling, the visual tokenizer that makes the image targets, and the retrieval (ITC) heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from mmpt.models.config_base import ModelConfigBase
from mmpt.modules.multiway_presets import beit3_base_dims, beit3_giant_dims, beit3_large_dims
from mmpt.visual_tokenizer import KINDS as TOKENIZER_KINDS
from mmpt.visual_tokenizer import VisualTokenizerConfig

# Loss terms, in the order they are computed and logged. mdm_text + mdm_image together are BEiT-3's one
# masked-data-modeling objective (reported by modality); itc trains the dual-encoder retrieval path.
OBJECTIVES = ("mdm_text", "mdm_image", "itc")
# The data kinds each term reads: texts and pairs carry text to mask, images and pairs patches.
KINDS_OF = {"mdm_text": ("texts", "pairs"), "mdm_image": ("images", "pairs"), "itc": ("pairs",)}
# MultiwayEncoder keyword arguments that are config fields of the same name.
ENCODER_KEYS = ("width", "layers", "heads", "image_size", "patch_size", "vocab_size", "max_text_len", "mlp_ratio",
                "ffn_dim", "vl_layers", "decoupled_attention", "sub_norm", "layer_scale", "dropout", "norm_eps")


@dataclass
class BEiT3Config(ModelConfigBase):
    """Defaults are the tiny CPU size in the released layout; `beit3_{base,large,giant}_config` are the papers'.

    objectives: the loss terms this model computes (a subset of OBJECTIVES); heads exist only for them, so
    an ITC-only stage carries no MLM/MIM head and needs no visual tokenizer file. Masked data modeling
    (the paper's only pretraining task) is [mdm_text, mdm_image]; the retrieval stage is [itc].
    text_mask_ratio / pair_text_mask_ratio: share of real, non-special text tokens masked in text-only
    samples (paper 15%) and in image-text pairs (paper 50%). The image mask comes with the data
    (`data.image_mask`, block-wise, 40%). visual_tokenizer: the image targets; its patch_size/image_size
    default to the model's and must agree with them. embed_dim: width of the ITC embeddings.
    """

    arch: str = "beit3"
    objectives: list[str] = field(default_factory=lambda: ["mdm_text", "mdm_image"])
    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    ffn_dim: Optional[int] = None  # None = width * mlp_ratio
    vl_layers: int = 0  # top blocks with a VL-FFN (paper giant: 3; released code: 0)
    decoupled_attention: bool = True  # released layout: per-modality attention; False = shared (paper)
    sub_norm: bool = True  # torchscale Sub-LN (needs decoupled_attention)
    layer_scale: Optional[float] = None
    vocab_size: int = 1000
    max_text_len: int = 32
    dropout: float = 0.0
    norm_eps: float = 1e-5
    embed_dim: int = 64
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0
    text_mask_ratio: float = 0.15
    pair_text_mask_ratio: float = 0.5
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4
    visual_tokenizer: VisualTokenizerConfig = field(default_factory=VisualTokenizerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.visual_tokenizer, dict):  # BEiT3Config(visual_tokenizer={...}) in code
            self.visual_tokenizer = VisualTokenizerConfig(**self.visual_tokenizer)
        self.objectives = list(self.objectives)
        problems = self._problems()
        if problems:
            raise ValueError("invalid BEiT-3 config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p: list[str] = []
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            p.append(f"objectives={self.objectives} must be distinct names from {list(OBJECTIVES)}, at least one "
                     "(masked data modeling: [mdm_text, mdm_image]; retrieval stage: [itc])")
        if self.image_size % self.patch_size != 0:
            p.append(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.width % self.heads != 0:
            p.append(f"width={self.width} must be divisible by heads={self.heads}")
        if not 0 <= self.vl_layers <= self.layers:
            p.append(f"vl_layers={self.vl_layers} must be in [0, layers={self.layers}]")
        if self.sub_norm and not self.decoupled_attention:
            p.append("sub_norm=true (released BEiT-3) needs decoupled_attention=true; set sub_norm=false for the "
                     "paper's shared-attention layout")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout} must be in [0, 1)")
        for key in ("text_mask_ratio", "pair_text_mask_ratio"):
            if not 0.0 < getattr(self, key) < 1.0:
                p.append(f"{key}={getattr(self, key)} must be in (0, 1)")
        special = (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)
        if len(set(special)) != 4 or not all(0 <= i < self.vocab_size for i in special):
            p.append(f"pad/cls/sep/mask token ids {special} must be distinct and < vocab_size={self.vocab_size}")
        if self.temperature_init <= 0 or 1.0 / self.temperature_init > self.max_logit_scale:
            p.append(f"temperature_init={self.temperature_init} must be > 0 and >= 1/max_logit_scale")
        vt = self.visual_tokenizer
        if vt.kind not in TOKENIZER_KINDS:
            p.append(f"visual_tokenizer.kind={vt.kind!r} must be one of {list(TOKENIZER_KINDS)}")
        if "mdm_image" in self.objectives and vt.kind in ("kmeans", "frozen") and not vt.path:
            p.append(f"visual_tokenizer.kind={vt.kind} needs visual_tokenizer.path (a tokenizer file; kmeans: "
                     "`mmpt-data visual-tokenizer --shards ... --codebook-size K --out FILE`), or use kind=pixels")
        for key in ("patch_size", "image_size"):
            if getattr(vt, key) is not None and getattr(vt, key) != getattr(self, key):
                p.append(f"visual_tokenizer.{key}={getattr(vt, key)} differs from the model's {key}="
                         f"{getattr(self, key)}; leave it null (= the model's) or make them equal")
        return p

    def encoder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MultiwayEncoder` (BEiT-3 has no modality-type embedding, no BERT text norm)."""
        return {key: getattr(self, key) for key in ENCODER_KEYS}

    def tokenizer_config(self) -> VisualTokenizerConfig:
        """The visual tokenizer config with the model's patch grid filled in (a check for file tokenizers)."""
        vt = self.visual_tokenizer
        return replace(vt, patch_size=vt.patch_size or self.patch_size, image_size=vt.image_size or self.image_size)

    def data_kinds(self) -> tuple[str, ...]:
        """The data kinds some configured objective reads, in `mmpt.data.batch.KINDS` order."""
        used = {kind for name in self.objectives for kind in KINDS_OF[name]}
        return tuple(kind for kind in ("pairs", "images", "texts") if kind in used)


def _from_dims(dims: dict[str, Any], **overrides: Any) -> BEiT3Config:
    known = {f.name for f in fields(BEiT3Config)}
    extra = sorted(set(dims) - known)
    assert not extra, f"multiway preset keys without a BEiT3Config field: {extra}"
    return BEiT3Config(**{**dims, **overrides})


def beit3_base_config(**overrides: Any) -> BEiT3Config:
    """Released BEiT-3 base: 768 x 12, decoupled attention with Sub-LN, vocab 64010, 1024 text positions,
    224 px / 16; ITC heads 768 -> 768 as in the released retrieval model."""
    return _from_dims(beit3_base_dims(), embed_dim=768, **overrides)


def beit3_large_config(**overrides: Any) -> BEiT3Config:
    """Released BEiT-3 large: 1024 x 24, FFN 4096."""
    return _from_dims(beit3_large_dims(), embed_dim=1024, **overrides)


def beit3_giant_config(**overrides: Any) -> BEiT3Config:
    """Paper BEiT-3 (1.9B): shared attention, VL-FFN in the top 3 of 40 blocks, 1408 wide, patch 14."""
    return _from_dims(beit3_giant_dims(), embed_dim=1408, decoupled_attention=False, sub_norm=False, **overrides)
