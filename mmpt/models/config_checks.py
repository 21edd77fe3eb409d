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
