"""CoCa `layout=open_clip`: open_clip's CoCa layout (ViT [CLS] kept, one 1 + N query pooler at the embedding
width, a self-attention block then a cross-attention block per decoder layer), so that
scripts/bench/bench_vs_peers.py compares models of equal size. open_clip is not installed in the test venv:
the parameter count is checked against a formula written from open_clip's modules, and against the count of
`open_clip.CoCa` itself measured once in the bench venv (open_clip 3.3.0)."""
from __future__ import annotations

import pytest
import torch

from mmpt.data.batch import Batch
from mmpt.models.coca import CoCa, CoCaConfig
from mmpt.models.registry import build_model, preset_config

# geometry: 32 px / patch 8 (16 patches), every width 32 (open_clip's decoder needs embed_dim == its width),
# one layer per tower, 4 decoder queries (a 5-query pooler), 50 tokens of vocabulary, 8 positions
VW, P, E, V, L, N = 32, 8, 32, 50, 8, 4
OPEN_CLIP_330_COUNT = 67_937  # sum(p.numel()) of the matching open_clip.CoCa(...), open_clip 3.3.0


def layout_config(**overrides: object) -> CoCaConfig:
    return preset_config(
        "coca", "tiny", layout="open_clip", image_pool="attention", num_decoder_queries=N, multimodal_layers=1,
        vision={"image_size": 32, "patch_size": P, "width": VW, "layers": 1, "heads": 2, "pre_norm": True,
                "patch_bias": False},
        text={"width": E, "layers": 1, "heads": 2, "vocab_size": V, "max_text_len": L},
        contrastive={"embed_dim": E}, **overrides,
    )  # fmt: skip


def open_clip_coca_params() -> int:
    """open_clip's CoCa at this geometry, module by module (transformer.py / coca_model.py, 3.3.0)."""
    def block(w: int) -> int:  # ResidualAttentionBlock: ln_1, in_proj (3w x w + 3w), out_proj, ln_2, c_fc, c_proj
        return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)

    n = (32 // P) ** 2
    pooler = (1 + N) * E + 2 * E + 2 * VW + (E * E + 2 * E * VW + 3 * E) + (E * E + E)  # query, ln_q, ln_k, attn
    vision = 3 * P * P * VW + VW + (1 + n) * VW + 2 * VW + block(VW) + pooler + 2 * E + E * E  # ..., ln_post, proj
    text = V * E + (L + 1) * E + E + block(E) + 2 * E + E * E  # tokens, positions (+ cls), cls_emb, ln_final, proj
    decoder = block(E) + (block(E) + 2 * E) + 2 * E + E * V  # self block, cross block (+ ln_1_kv), ln_final, proj
    return vision + text + decoder + 1  # + logit_scale


def make_batch(b: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([8, 5, 3, 6])[:b]
    pos = torch.arange(L)[None]
    ids = torch.randint(5, V, (b, L), generator=g)
    ids = torch.where(pos == lengths[:, None] - 1, 3, ids).masked_fill(pos >= lengths[:, None], 0)
    ids[:, 0] = 2
    return Batch(images=torch.randn(b, 3, 32, 32, generator=g), input_ids=ids, attention_mask=(pos < lengths[:, None]).long())


@pytest.fixture(scope="module")
def model() -> CoCa:
    torch.manual_seed(0)
    return build_model(layout_config()).eval()


def test_parameter_count_equals_open_clip(model: CoCa) -> None:
    assert open_clip_coca_params() == OPEN_CLIP_330_COUNT
    assert sum(p.numel() for p in model.parameters()) == OPEN_CLIP_330_COUNT
    assert model.pooler is not None and model.pooler.num_queries == 1 + N
    assert model.visual.patch_embed.cls_token is not None  # [CLS] kept
    assert len(model.multimodal.blocks) == len(model.multimodal.cross_blocks) == 1  # type: ignore[union-attr]


def test_one_pooler_serves_both_losses(model: CoCa) -> None:
    """Query 0 gives the contrastive embedding and queries 1..N the decoder context, from ONE pooler pass."""
    batch = make_batch()
    with torch.no_grad():
        tokens = model.visual(batch.images)
        pooled = model.pooler(tokens)  # type: ignore[misc]
        embedding, context = model._image(batch.images)
    assert pooled.shape == (4, 1 + N, E) and context.shape == (4, N, E)
    torch.testing.assert_close(context, pooled[:, 1:])
    torch.testing.assert_close(embedding, torch.nn.functional.normalize(model.vision_proj(pooled[:, 0]), dim=-1))
    torch.testing.assert_close(model.encode_image(batch.images), embedding)


def test_training_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model(layout_config())
    out = model(make_batch())
    assert set(out.losses) == {"itc", "caption"}
    sum(out.losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_cached_generation_equals_recompute(model: CoCa) -> None:
    images = make_batch().images
    cached = model.generate(images, max_len=6, use_cache=True)
    recomputed = model.generate(images, max_len=6, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_flops_count_both_decoder_blocks(model: CoCa) -> None:
    """The decoder's FLOPs: 6 * weights * tokens over its L - 1 = 7 tokens (cross kv over the N context
    tokens) + 12 * n * (n + m) * d for the scores; checked against the parts' weight counts."""
    dec = model.multimodal
    linear = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]  # type: ignore[union-attr]
    kv = dec.cross_blocks[0].cross_attn.kv.weight.numel()  # type: ignore[union-attr]
    n, m = L - 1, N
    expected = 6.0 * ((sum(x.weight.numel() for x in linear) - kv) * n + kv * m) + 12.0 * n * (n + m) * E
    assert dec.flops(n, context_tokens=m) == expected  # type: ignore[union-attr]
    assert sum(x.weight.numel() for x in linear) == 2 * 12 * E * E  # two blocks of 12 d^2 matmul weights


def test_layout_validation() -> None:
    with pytest.raises(ValueError, match="layout='hf' must be 'mmpt' or 'open_clip'"):
        CoCaConfig(layout="hf")
    with pytest.raises(ValueError, match="set image_pool=attention"):
        CoCaConfig(layout="open_clip", image_pool="mean")


def test_open_clip_weight_import_refuses_this_layout(model: CoCa) -> None:
    """mmpt/interop/open_clip.py maps onto layout=mmpt only; here ln_post/proj would land on wrong tensors."""
    from mmpt.interop.open_clip import load_open_clip

    with pytest.raises(ValueError, match="needs model.layout=mmpt"):
        load_open_clip(model, {"visual.class_embedding": torch.zeros(VW)}, "coca.pt")
