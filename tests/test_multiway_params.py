"""Published parameter counts of the Multiway presets, built on the meta device (never materialised).

The accounting (which norms, embeddings and biases each layout has) is in mmpt/models/multiway_presets.py.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mmpt.modules.multiway_encoder import MultiwayEncoder
from mmpt.models.multiway_presets import (
    PARTS,
    beit3_base_dims,
    beit3_giant_dims,
    beit3_large_dims,
    param_counts_by_part,
    part_of,
    vlmo_base_dims,
    vlmo_large_dims,
)


def _counts(dims: Callable[[], dict[str, Any]]) -> dict[str, int]:
    with torch.device("meta"):
        encoder = MultiwayEncoder(**dims())
    assert all(p.is_meta for p in encoder.parameters())
    counts = param_counts_by_part(encoder)
    assert sum(counts.values()) == sum(p.numel() for p in encoder.parameters())
    return counts


def _close(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


@pytest.mark.parametrize(
    ("dims", "paper", "computed"),
    [(vlmo_base_dims, 175e6, 175.9e6), (vlmo_large_dims, 562e6, 562e6)],
)
def test_vlmo_sizes(dims: Callable[[], dict[str, Any]], paper: float, computed: float) -> None:
    total = sum(_counts(dims).values())
    assert _close(total, paper, 0.01) and _close(total, computed, 0.01), f"{total / 1e6:.2f}M"


def test_vlmo_base_parts_by_hand() -> None:
    """768 wide, FFN 3072: attention 4 d^2 + 4 d + norm 2 d per block; expert 2 d f + f + d + norm 2 d."""
    d, f = 768, 3072
    counts = _counts(vlmo_base_dims)
    expert = 2 * d * f + f + d + 2 * d
    assert counts["attention"] == 12 * (4 * d * d + 4 * d + 2 * d)
    assert counts["ffn_v"] == counts["ffn_l"] == 12 * expert
    assert counts["ffn_vl"] == 2 * expert
    # patch conv + bias, [CLS], [MASK], 197 positions; words, 40 positions, LayerNorm; 2 modality types
    assert counts["embeddings"] == (3 * 16 * 16 * d + d) + 2 * d + 197 * d + 30522 * d + 40 * d + 2 * d + 2 * d
    assert counts["other"] == 2 * d + 12 * 2 * d  # final LayerNorm, layer scales


@pytest.mark.parametrize(("dims", "target"), [(beit3_base_dims, 221.0e6), (beit3_large_dims, 672.7e6)])
def test_beit3_released_backbone(dims: Callable[[], dict[str, Any]], target: float) -> None:
    counts = _counts(dims)
    total = sum(counts.values())
    assert _close(total, target, 0.005), f"{total / 1e6:.2f}M"
    assert counts["ffn_vl"] == 0 and counts["ffn_v"] == counts["ffn_l"]


def test_beit3_giant_paper_parts() -> None:
    counts = _counts(beit3_giant_dims)
    for part, target in (("attention", 317e6), ("ffn_v", 692e6), ("ffn_l", 692e6), ("ffn_vl", 52e6)):
        assert _close(counts[part], target, 0.01), f"{part}: {counts[part] / 1e6:.1f}M"
    total = sum(counts.values())
    assert _close(total, 1.9e9, 0.03), f"{total / 1e9:.3f}B"


def test_part_of_matches_whole_name_components() -> None:
    assert part_of("transformer.blocks.3.ffn_vl.mlp.fc1.weight") == "ffn_vl"
    assert part_of("transformer.blocks.3.ffn_v.norm.weight") == "ffn_v"
    assert part_of("transformer.blocks.0.attn.l.qkv.bias") == "attention"
    assert part_of("transformer.blocks.0.attn_norm.weight") == "attention"
    assert part_of("patch_embed.mask_token") == "embeddings"
    assert part_of("norm_v.weight") == "other"
    assert set(param_counts_by_part(torch.nn.Linear(2, 2))) == set(PARTS)
