"""VLMo's configuration: what VLMo adds to the shared pieces (nothing but its objectives), and its presets.

Backbone sizes come from mmpt/models/multiway_presets.py (one place says what "VLMo-Base" means).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmpt.models.config_parts import FusionObjectivesConfig, MultiwayModelConfig
from mmpt.models.multiway_presets import vlmo_base_dims, vlmo_large_dims


@dataclass
class VLMoConfig(MultiwayModelConfig, FusionObjectivesConfig):
    """objectives: itc (dual encoder), itm + mlm (one fused pass; mlm also reads text-only data), mim (masked
    image modeling on image-only data with `visual_tokenizer` targets; stage 1). Heads exist only for the
    listed objectives; the ITC projections always exist (retrieval embeds through them) and are frozen when
    itc is not listed.
    """

    supported_objectives: ClassVar[tuple[str, ...]] = ("itc", "itm", "mlm", "mim")
    default_objectives: ClassVar[tuple[str, ...]] = ("itc", "itm", "mlm")
    no_siglip_because: ClassVar[str] = "ITM mines its hard negatives from the softmax over ITC similarities"

    arch_name: ClassVar[str] = "vlmo"

    def problems(self) -> list[str]:
        p = super().problems() + self.fusion_problems() + self.tokenizer_file_problems("mim")
        p += self.patch_dropout_problems(("mim",))
        if (self.uses("itm") or self.uses("mlm")) and self.multiway.vl_layers < 1:
            p.append(f"multiway.vl_layers={self.multiway.vl_layers} must be >= 1 for itm/mlm (the fused pass)")
        return p


def _paper(dims: dict[str, Any]) -> dict[str, Any]:
    """A paper size: its backbone, ITC projecting to the hidden width as VLMo does."""
    return {"multiway": dims, "contrastive": {"embed_dim": dims["width"]}}


PRESETS: dict[str, dict[str, Any]] = {
    # 64 wide, 2 MoME blocks, VL-FFN in the top 1, 64 px / patch 8. From scratch at this size BERT's embedding
    # LayerNorm and 0.1 layer scales make every text [CLS] almost the same vector and ITC stalls at ln(batch)
    # (on 16 fixed pairs, 60 AdamW steps: ITC 2.77 -> 2.12 with the LayerNorm, 0.03 without), so tiny has neither.
    # ITC from temperature 0.03 and ITM negatives hardening over 1,000 steps: t2i R@1 0.306 vs 0.205 with fully
    # hard ones from step 0 (docs/RESULTS.md, issue 11)
    "tiny": {"multiway": {"norm_eps": 1e-6}, "contrastive": {"temperature_init": 0.03},
             "itm": {"hardness_warmup_steps": 1000}, "init_std": 0.05},
    "base": _paper(vlmo_base_dims()),  # VLMo-Base/16: 175.43M backbone
    "large": _paper(vlmo_large_dims()),  # VLMo-Large/16: 561.34M backbone
}
