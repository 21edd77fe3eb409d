"""Fusion building blocks: cross-attention, cross-attending blocks, KV-cached decoding, pooler, ITM/MLM heads."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmpt.engine.optim import param_groups
from mmpt.modules.attention import CrossAttention, make_attn_mask
from mmpt.modules.block import Block, Transformer, init_weights_, no_weight_decay_names
from mmpt.modules.heads import ITMHead, LMHead, MLMHead
from mmpt.modules.kv_cache import KVCache, TransformerCache
from mmpt.modules.pooler import AttentionalPooler

B, N, M, D, C, H, V = 2, 6, 5, 32, 48, 4, 40  # batch, text len, context len, width, context width, heads, vocab


def _context_mask() -> torch.Tensor:
    keep = torch.ones(B, M, dtype=torch.long)
    keep[0, 3:] = 0
    keep[1, 4:] = 0
    return keep


def reference_cross_attention(attn: CrossAttention, x: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V head by head with plain indexing (no einops, no SDPA)."""
    b, n, dim = x.shape
    hd = dim // attn.num_heads
    q_all = x @ attn.q.weight.T + attn.q.bias  # `b n d`, heads contiguous
    kv = ctx @ attn.kv.weight.T + attn.kv.bias  # `b m 2d`, laid out [k | v]
    out = torch.zeros(b, n, dim, dtype=x.dtype)
    allowed = torch.ones(b, n, ctx.shape[1], dtype=torch.bool)
    if keep is not None:
        allowed &= keep.bool()[:, None, :]
    for h in range(attn.num_heads):
        q = q_all[:, :, h * hd : (h + 1) * hd]
        k = kv[:, :, h * hd : (h + 1) * hd]
        v = kv[:, :, dim + h * hd : dim + (h + 1) * hd]
        scores = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        out[:, :, h * hd : (h + 1) * hd] = (weights / weights.sum(dim=-1, keepdim=True)) @ v
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.fixture
def cross() -> CrossAttention:
    torch.manual_seed(0)
    layer = CrossAttention(D, H, context_dim=C)
    init_weights_(layer, std=0.2)  # far-from-uniform attention makes mask bugs visible
    for lin in (layer.q, layer.kv, layer.proj):
        nn.init.normal_(lin.bias, std=0.1)
    return layer.double().eval()


@pytest.mark.parametrize("use_mask", [False, True])
def test_cross_attention_matches_reference(cross: CrossAttention, use_mask: bool) -> None:
    x, ctx = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, M, C, dtype=torch.float64)
    keep = _context_mask() if use_mask else None
    torch.testing.assert_close(cross(x, ctx, keep), reference_cross_attention(cross, x, ctx, keep), atol=1e-10, rtol=1e-10)
    assert cross.kv.in_features == C and cross.q.in_features == D


def test_masked_context_tokens_get_zero_weight(cross: CrossAttention) -> None:
    x, ctx = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, M, C, dtype=torch.float64)
    keep = _context_mask()
    other = ctx.clone()
    other[keep == 0] = torch.randn(int((keep == 0).sum()), C, dtype=torch.float64) * 10
    torch.testing.assert_close(cross(x, ctx, keep), cross(x, other, keep), atol=1e-12, rtol=0)
    assert not torch.allclose(cross(x, ctx), cross(x, other))  # without the mask they leak


def test_make_attn_mask_causal_is_bottom_right_for_cached_queries() -> None:
    mask = make_attn_mask(2, 5, is_causal=True)
    assert mask is not None and mask.shape == (2, 5)
    assert mask[0].tolist() == [True, True, True, True, False] and mask[1].all()
    assert make_attn_mask(1, 5, is_causal=True) is None  # one new token sees every cached key
    assert make_attn_mask(4, 4, is_causal=True) is None  # square: SDPA's own is_causal
    keep = torch.ones(B, 5, dtype=torch.long)
    merged = make_attn_mask(1, 5, keep, is_causal=True)
    assert merged is not None and merged.shape == (B, 1, 1, 5)


def test_cross_block_depends_on_context_plain_block_rejects_it() -> None:
    torch.manual_seed(0)
    block = Block(D, H, cross_attention=True, context_dim=C).eval()
    x, ctx = torch.randn(B, N, D), torch.randn(B, M, C)
    out = block(x, context=ctx)
    assert out.shape == (B, N, D)
    assert not torch.allclose(out, block(x, context=ctx + 1.0))
    # Without a context the cross branch is skipped: the block equals a plain block with the same weights.
    plain = Block(D, H).eval()
    missing, unexpected = plain.load_state_dict(block.state_dict(), strict=False)
    assert not missing and all(k.startswith(("cross_attn.", "norm_cross.")) for k in unexpected)
    torch.testing.assert_close(block(x), plain(x))
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, context=ctx)
    with pytest.raises(ValueError, match="context_dim"):
        Block(D, H, context_dim=C)
    assert "norm_cross.weight" not in dict(plain.named_parameters())  # plain (CLIP) blocks keep their names


def test_cross_block_self_attention_keeps_causal_and_padding() -> None:
    torch.manual_seed(0)
    block = Block(D, H, cross_attention=True, context_dim=C).double().eval()
    x, ctx = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, M, C, dtype=torch.float64)
    keep = torch.ones(B, N, dtype=torch.long)
    keep[1, 4:] = 0
    kw = dict(key_padding_mask=keep, is_causal=True, context=ctx, context_mask=_context_mask())
    base = block(x, **kw)
    future = x.clone()
    future[:, 3] += 5.0  # causal: positions < 3 must not see it
    torch.testing.assert_close(block(future, **kw)[:, :3], base[:, :3])
    assert not torch.allclose(block(future, **kw)[:, 3:], base[:, 3:])
    padded = x.clone()
    padded[1, 4:] += 5.0  # padded keys: no real token may see them
    torch.testing.assert_close(block(padded, **kw)[1, :4], base[1, :4])


class TinyDecoder(nn.Module):
    """CoCa-style text decoder for the cache test: embeddings -> cross-attending causal stack -> LN -> LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(V, D)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, D) * 0.02)
        self.stack = Transformer(D, layers=2, heads=H, cross_attention=True, context_dim=C)
        self.norm = nn.LayerNorm(D)
        self.head = LMHead(D, V)

    def forward(self, ids, keep, ctx, ctx_keep, cache: TransformerCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0  # positions continue after the cached ones
        x = self.token_embed(ids) + self.pos_embed[:, start : start + ids.shape[1]]
        x = self.stack(x, key_padding_mask=keep, is_causal=True, context=ctx, context_mask=ctx_keep, cache=cache)
        return self.head(self.norm(x))


def test_kv_cache_decoding_equals_full_forward() -> None:
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    ctx, ctx_keep = torch.randn(B, M, C), _context_mask()
    ids = torch.randint(0, V, (B, 3))  # prompt; sample 1 has a padded prompt token
    keep = torch.ones(B, 3, dtype=torch.long)
    keep[1, 1] = 0
    kv_calls = []
    for blk in model.stack.blocks:
        blk.cross_attn.kv.register_forward_hook(lambda *_: kv_calls.append(1))
    cache = model.stack.new_cache()
    with torch.no_grad():
        step_logits = model(ids, keep, ctx, ctx_keep, cache=cache)
        torch.testing.assert_close(step_logits, model(ids, keep, ctx, ctx_keep), atol=1e-5, rtol=0)
        for step in range(5):
            # Greedy: append the argmax; on step 2 feed two tokens at once (multi-token cached step).
            nxt = step_logits[:, -1].argmax(-1, keepdim=True)
            new = torch.cat([nxt, (nxt + 1) % V], dim=1) if step == 2 else nxt
            ids = torch.cat([ids, new], dim=1)
            keep = torch.cat([keep, torch.ones_like(new)], dim=1)
            context = ctx if step % 2 == 0 else None  # cached context k/v: the context may be omitted
            step_logits = model(new, keep, context, ctx_keep, cache=cache)
            full_logits = model(ids, keep, ctx, ctx_keep)[:, -new.shape[1] :]
            torch.testing.assert_close(step_logits, full_logits, atol=1e-5, rtol=0)
    assert cache.length == ids.shape[1] == 9
    assert cache.layers[0].self_attn.k is not None and cache.layers[0].self_attn.k.shape == (B, H, 9, D // H)
    # Context k/v: one projection per layer for the cached run, plus one per layer per full recomputation.
    assert len(kv_calls) == len(model.stack.blocks) * (1 + 1 + 5)
    with pytest.raises(ValueError, match="layers"):
        model.stack(torch.randn(B, 1, D), cache=TransformerCache.empty(3))


def test_kv_cache_object() -> None:
    cache = KVCache()
    assert cache.length == 0
    k, v = cache.append(torch.zeros(B, H, 2, 8), torch.ones(B, H, 2, 8))
    k, v = cache.append(torch.zeros(B, H, 1, 8), torch.ones(B, H, 1, 8))
    assert cache.length == 3 and k.shape == v.shape == (B, H, 3, 8)
    assert TransformerCache.empty(2).length == 0


def test_attentional_pooler() -> None:
    torch.manual_seed(0)
    pooler = AttentionalPooler(D, C, num_queries=3, num_heads=H).eval()
    init_weights_(pooler.attn, std=0.2)
    nn.init.normal_(pooler.cls_token, std=1.0)
    ctx, keep = torch.randn(B, M, C), _context_mask()
    out = pooler(ctx, keep)
    assert out.shape == (B, 3, D)
    torch.testing.assert_close(out.mean(-1), torch.zeros(B, 3), atol=1e-5, rtol=0)  # final LayerNorm
    other = ctx.clone()
    other[keep == 0] += 10.0
    torch.testing.assert_close(pooler(other, keep), out)
    assert not torch.allclose(pooler(other), pooler(ctx))
    assert AttentionalPooler(D, C, num_queries=1, num_heads=H)(ctx).shape == (B, 1, D)
    # The queries are [CLS]-like tokens: token init, and no weight decay in the optimizer groups.
    fresh = AttentionalPooler(D, C, num_queries=256, num_heads=H)
    assert 0.015 < fresh.cls_token.std() < 0.025
    assert "cls_token" in no_weight_decay_names(fresh)
    assert any(p is fresh.cls_token for p in param_groups(fresh, 0.1)[1]["params"])
    assert "attn.kv.weight" not in no_weight_decay_names(fresh)


class TiedMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.mlm = MLMHead(D, V, self.embed)


def test_mlm_head_ties_to_word_embeddings() -> None:
    torch.manual_seed(0)
    model = TiedMLM()
    before = model.embed.weight.detach().clone()
    assert model.mlm.decoder.weight is model.embed.weight and model.mlm.tied
    assert model.mlm.decoder.weight.data_ptr() == model.embed.weight.data_ptr()
    torch.testing.assert_close(model.embed.weight, before)
    assert len(list(model.parameters())) == 1 + 5  # shared matrix counted once; transform (2), norm (2), bias
    logits = model.mlm(torch.randn(B, N, D))
    assert logits.shape == (B, N, V)
    logits.logsumexp(-1).sum().backward()  # loss through the head only
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    assert model.mlm.bias.grad is not None and "mlm.bias" in no_weight_decay_names(model)
    with pytest.raises(ValueError, match="tied word embeddings"):
        MLMHead(D, V + 1, model.embed)
    # Materialising a meta-built model copies per module; tie_ restores the sharing.
    with torch.device("meta"):
        meta = TiedMLM()
    meta.to_empty(device="cpu")
    meta.mlm.tie_(meta.embed)
    assert meta.mlm.decoder.weight is meta.embed.weight


def test_lm_head_untied_by_default_and_itm_head() -> None:
    head = LMHead(D, V)
    assert not head.tied and head.bias is None and head.transform is None
    assert head(torch.randn(B, N, D)).shape == (B, N, V)
    assert 0.015 < head.decoder.weight.std() < 0.025
    assert set(dict(head.named_parameters())) == {"decoder.weight"}
    itm = ITMHead(D)
    assert itm(torch.randn(B, D)).shape == (B, 2)
    assert itm.flops_per_sample() == 6 * 2 * D


def _measured_flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        fn().sum().backward()
    return counter.get_total_flops()


def test_flops_formulas_match_counter() -> None:
    torch.manual_seed(0)
    stack = Transformer(D, layers=2, heads=H, cross_attention=True, context_dim=C)
    x, ctx = torch.randn(1, N, D, requires_grad=True), torch.randn(1, M, C, requires_grad=True)
    assert _measured_flops(lambda: stack(x, context=ctx)) == pytest.approx(stack.flops(N, context_tokens=M), rel=0.01)
    with pytest.raises(ValueError, match="context_tokens"):
        stack.flops(N)
    assert Transformer(D, layers=2, heads=H).flops(N) == 6 * 2 * 12 * D * D * N + 12 * 2 * N * N * D  # unchanged
    pooler = AttentionalPooler(D, C, num_queries=3, num_heads=H)
    assert _measured_flops(lambda: pooler(ctx)) == pytest.approx(pooler.flops_per_sample(M), rel=0.01)
    mlm = TiedMLM().mlm
    h = torch.randn(1, N, D, requires_grad=True)
    assert _measured_flops(lambda: mlm(h)) == pytest.approx(mlm.flops(N), rel=0.01)
