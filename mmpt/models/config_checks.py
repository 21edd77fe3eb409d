"""Consistency checks every image-text architecture config shares (one message per problem)."""
from __future__ import annotations

from typing import Any


def tower_problems(cfg: Any) -> list[str]:
    """Patch grid, head widths and dropout: the checks every ViT + text-tower config needs."""
    problems = []
    if cfg.image_size % cfg.patch_size != 0:
        problems.append(f"image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size}")
    if cfg.vision_width % cfg.vision_heads != 0:
        problems.append(f"vision_width={cfg.vision_width} must be divisible by vision_heads={cfg.vision_heads}")
    if cfg.text_width % cfg.text_heads != 0:
        problems.append(f"text_width={cfg.text_width} must be divisible by text_heads={cfg.text_heads}")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout={cfg.dropout} must be in [0, 1)")
    return problems


def itc_mlm_problems(cfg: Any) -> list[str]:
    """Checks shared by the ITC + MLM models (ALBEF, VLMo): temperature bounds, MLM rate, special token ids."""
    p: list[str] = []
    if not 0 < cfg.min_temperature <= cfg.temperature_init <= cfg.max_temperature:
        p.append(
            f"need 0 < min_temperature <= temperature_init <= max_temperature, got "
            f"{cfg.min_temperature}, {cfg.temperature_init}, {cfg.max_temperature}"
        )
    if not 0.0 < cfg.mlm_prob < 1.0:
        p.append(f"mlm_prob={cfg.mlm_prob} must be in (0, 1)")
    special = (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id)
    if len(set(special)) != 4 or not all(0 <= i < cfg.vocab_size for i in special):
        p.append(f"pad/cls/sep/mask token ids {special} must be distinct and < vocab_size={cfg.vocab_size}")
    return p
