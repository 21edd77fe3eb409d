"""Published Multiway backbone sizes (kwargs for `MultiwayEncoder`) and a per-part parameter count.

Model presets, configs and tests take their dims from here, so one place says what "VLMo-Base" means.
Parameter accounting (all counts: the backbone only, no pooler / ITC / ITM / MLM / MIM heads):

VLMo (unilm/vlmo `MultiWayTransformer` + `BertEmbeddings` + modality `token_type_embeddings`):
  shared attention + its LayerNorm, three experts (V/L/VL-FFN) each with its own LayerNorm, VL-FFN only in the
  top 2 (base) / 3 (large) blocks, layer scale (2 d per block), one final LayerNorm, a 2-row modality-type
  embedding, BERT-style text embedding (word + 40 positions + LayerNorm), patch conv + [CLS] (+ [MASK]).
  Base 175.43M (paper 175M; REFERENCE "computed 175.9M"), large 561.34M (paper 562M). Differences from the
  released code (released: base 175.43M, large 561.54M), each < 0.05%: absolute image positions (197 x d)
  instead of the relative position bias table (1126 x heads x layers), a full qkv bias instead of q/v biases
  only, one modality-type table instead of BERT token types + modality types, and the [MASK] token (d).
Released BEiT-3 (torchscale `multiway=True, subln=True`; unilm/beit3 `_get_base_config`):
  everything per modality (A = vision, B = language): attention LayerNorm, q/k/v/out projections with
  biases, Sub-LN before out_proj, FFN LayerNorm, fc1/fc2 with biases, Sub-LN on the FFN hidden (ffn_dim),
  final LayerNorm; no VL-FFN, no type embeddings, no relative position bias (rel_pos_buckets=0); vision
  positions for [CLS] + patches, 1024 text positions (max_source_positions), patch conv, [CLS], [MASK],
  vocab 64010. Base 220.99M (REFERENCE 221.0M: torchscale's 2 unused fairseq offset rows of vision
  positions are the only difference, 2 d), large 672.70M (REFERENCE 672.7M).
BEiT-3 paper layout (giant): VLMo-style shared attention, VL-FFN in the top 3 of 40 blocks, 1408 wide, FFN
  6144, patch 14 at 224 px: attention 317.5M, V-FFN 692.5M, L-FFN 692.5M, VL-FFN 51.9M (paper 317/692/692/52M),
  backbone 1.847B; the paper's 1.9B also counts heads (an untied 1408 x 64010 MLM head alone is 90M).
"""
from __future__ import annotations

from typing import Any

from torch import nn

PARTS = ("attention", "ffn_v", "ffn_l", "ffn_vl", "embeddings", "other")
EMBEDDING_MODULES = ("patch_embed", "text_embed", "type_embed")


def vlmo_base_dims() -> dict[str, Any]:
    """VLMo-Base/16: 768 wide, 12 blocks, 12 heads, VL-FFN in the top 2, BERT vocab, 40 text tokens."""
    return dict(
        width=768, layers=12, heads=12, mlp_ratio=4.0, vl_layers=2, image_size=224, patch_size=16,
        vocab_size=30522, max_text_len=40, type_embed=True, text_embed_norm=True, layer_scale=0.1, norm_eps=1e-6,
    )  # fmt: skip


def vlmo_large_dims() -> dict[str, Any]:
    """VLMo-Large/16: 1024 wide, 24 blocks, 16 heads, VL-FFN in the top 3."""
    return {**vlmo_base_dims(), "width": 1024, "layers": 24, "heads": 16, "vl_layers": 3}


def beit3_base_dims() -> dict[str, Any]:
    """Released BEiT-3 base (torchscale layout): decoupled Multiway attention with Sub-LN, no VL-FFN."""
    return dict(
        width=768, layers=12, heads=12, ffn_dim=3072, vl_layers=0, decoupled_attention=True, sub_norm=True,
        type_embed=False, image_size=224, patch_size=16, vocab_size=64010, max_text_len=1024,
    )  # fmt: skip


def beit3_large_dims() -> dict[str, Any]:
    """Released BEiT-3 large: 1024 wide, 24 blocks, 16 heads, FFN 4096."""
    return {**beit3_base_dims(), "width": 1024, "layers": 24, "heads": 16, "ffn_dim": 4096}


def beit3_giant_dims() -> dict[str, Any]:
    """BEiT-3 paper giant (1.9B): shared attention, VL-FFN in the top 3 of 40 blocks, patch 14."""
    return dict(
        width=1408, layers=40, heads=16, ffn_dim=6144, vl_layers=3, decoupled_attention=False, sub_norm=False,
        type_embed=False, image_size=224, patch_size=14,
        vocab_size=64010, max_text_len=1024,
    )  # fmt: skip


def part_of(name: str) -> str:
    """Which of PARTS a `named_parameters()` name belongs to (matching whole dotted components, so that
    `ffn_v` never swallows `ffn_vl`). An expert's own LayerNorm counts with the expert; attention norms
    (shared or per modality, Sub-LN included) with attention; final norms and layer scales are `other`."""
    parts = name.split(".")
    for expert in ("ffn_vl", "ffn_v", "ffn_l"):
        if expert in parts:
            return expert
    if any(p.startswith("attn") for p in parts):
        return "attention"
    if any(p in EMBEDDING_MODULES for p in parts):
        return "embeddings"
    return "other"


def param_counts_by_part(module: nn.Module) -> dict[str, int]:
    """Element counts per part of PARTS (shared tensors once; works on the meta device)."""
    counts = dict.fromkeys(PARTS, 0)
    for name, p in module.named_parameters():
        counts[part_of(name)] += p.numel()
    return counts
