"""BEiT-3's configuration: what BEiT-3 adds to the shared pieces (masked data modeling ratios), its presets.

Backbone dimensions come from mmpt/models/multiway_presets.py (one place says what "BEiT-3 base" means).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmpt.models.config_parts import Launch, MultiwayModelConfig
from mmpt.models.multiway_presets import beit3_base_dims, beit3_giant_dims, beit3_large_dims


@dataclass
class BEiT3Config(MultiwayModelConfig):
    """objectives: mdm_text + mdm_image together are BEiT-3's one masked-data-modeling objective (logged by
    modality); itc (or siglip) trains the dual-encoder retrieval path (a separate short stage). Heads exist only for the
    listed objectives; the ITC projections always exist (frozen when itc is not listed).
    text_mask_ratio / pair_text_mask_ratio: share of real, non-special text tokens masked in text-only
    samples (paper 15%) and in image-text pairs (paper 50%). The image mask comes with the data
    (`data.image_mask`, block-wise, 40%).
    """

    supported_objectives: ClassVar[tuple[str, ...]] = ("mdm_text", "mdm_image", "itc", "siglip")
    default_objectives: ClassVar[tuple[str, ...]] = ("mdm_text", "mdm_image")

    arch_name: ClassVar[str] = "beit3"
    text_mask_ratio: float = 0.15
    pair_text_mask_ratio: float = 0.5

    def problems(self) -> list[str]:
        p = super().problems() + self.tokenizer_file_problems("mdm_image") + self.patch_dropout_problems(("mdm_image",))
        for key in ("text_mask_ratio", "pair_text_mask_ratio"):
            if not 0.0 < getattr(self, key) < 1.0:
                p.append(f"{key}={getattr(self, key)} must be in (0, 1)")
        return p

    def launch_problems(self, launch: Launch) -> list[str]:
        p = super().launch_problems(launch)
        if launch.training and self.uses("mdm_image") and launch.image_mask_patch is None:  # else step 1 fails
            p.append("objective mdm_image predicts masked patches but the data makes no patch masks: use "
                     "experiment=beit3_tiny_mdm, or data.image_mask.enabled=true with data.image_mask.patch_size "
                     "equal to the model's, or drop mdm_image from model.objectives")
        return p


_RELEASED = {"vl_layers": 0, "decoupled_attention": True, "sub_norm": True, "type_embed": False}

PRESETS: dict[str, dict[str, Any]] = {
    # the released layout (decoupled Multiway attention with Sub-LN, no VL-FFN) at 64 wide x 2, 64 px / patch 8
    "tiny": {"multiway": _RELEASED},
    # released BEiT-3 base / large (torchscale); ITC heads project to the hidden width as released
    "base": {"multiway": beit3_base_dims(), "contrastive": {"embed_dim": 768}},
    "large": {"multiway": beit3_large_dims(), "contrastive": {"embed_dim": 1024}},
    # paper BEiT-3 (1.9B): shared attention, VL-FFN in the top 3 of 40 blocks, 1408 wide, patch 14
    "giant": {"multiway": beit3_giant_dims(), "contrastive": {"embed_dim": 1408}},
}
