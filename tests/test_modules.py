"""Shared building blocks: attention against a hand-written reference, blocks, embeddings, towers."""
from __future__ import annotations

import math

import pytest
import torch

from mmpt.modules.attention import (CPU_ATTENTION_MAX_KEYS, Attention, attend, cpu_attention_path,
                                    make_attn_mask)
from mmpt.modules.block import Block, Transformer, init_weights_, no_weight_decay_names
from mmpt.modules.embeddings import PatchEmbedding, TextEmbedding
from mmpt.modules.encoders import TextTransformer, VisionTransformer
from mmpt.modules.heads import ProjectionHead, l2_normalize
from mmpt.modules.mlp import Mlp

B, N, D, H = 2, 7, 32, 4


def reference_attention(
    attn: Attention, x: torch.Tensor, keep: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V, head by head with plain indexing (no einops, no SDPA)."""
    b, n, dim = x.shape
    hd = dim // attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # `b n 3d`, laid out [q | k | v], each [head0 | head1 ...]
    out = torch.zeros(b, n, dim, dtype=x.dtype)
    allowed = torch.ones(b, n, n, dtype=torch.bool)
    if keep is not None:
        allowed &= keep.bool()[:, None, :]
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()[None]
    for h in range(attn.num_heads):
        q = qkv[:, :, h * hd : (h + 1) * hd]
        k = qkv[:, :, dim + h * hd : dim + (h + 1) * hd]
        v = qkv[:, :, 2 * dim + h * hd : 2 * dim + (h + 1) * hd]
        scores = q @ k.transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out[:, :, h * hd : (h + 1) * hd] = weights @ v
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.fixture
def attn() -> Attention:
    torch.manual_seed(0)
    layer = Attention(D, H)
    init_weights_(layer, std=0.2)  # larger weights: far-from-uniform attention makes mask bugs visible
    for lin in (layer.qkv, layer.proj):
        torch.nn.init.normal_(lin.bias, std=0.1)
    return layer.double().eval()


def _keep_mask() -> torch.Tensor:
    keep = torch.ones(B, N, dtype=torch.long)
    keep[0, 5:] = 0
    keep[1, 3:] = 0
    return keep


@pytest.mark.parametrize("use_pad,causal", [(False, False), (True, False), (False, True), (True, True)])
def test_attention_matches_reference(attn: Attention, use_pad: bool, causal: bool) -> None:
    x = torch.randn(B, N, D, dtype=torch.float64)
    keep = _keep_mask() if use_pad else None
    got = attn(x, key_padding_mask=keep, is_causal=causal)
    want = reference_attention(attn, x, keep, causal)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_padded_keys_get_zero_weight(attn: Attention) -> None:
    """Changing the inputs at padded positions leaves every query's output unchanged."""
    x = torch.randn(B, N, D, dtype=torch.float64)
    keep = _keep_mask()
    y = x.clone()
    y[keep == 0] = torch.randn(int((keep == 0).sum()), D, dtype=torch.float64) * 10
    real = keep.bool()  # padded rows' own outputs change with their inputs; only real rows must not
    torch.testing.assert_close(attn(x, key_padding_mask=keep)[real], attn(y, key_padding_mask=keep)[real])
    torch.testing.assert_close(
        attn(x, key_padding_mask=keep, is_causal=True)[real], attn(y, key_padding_mask=keep, is_causal=True)[real]
    )
    assert not torch.allclose(attn(x)[real], attn(y)[real])  # without the mask they do leak


def test_causal_future_keys_do_not_leak(attn: Attention) -> None:
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = x.clone()
    y[:, 4] += 5.0
    out_x, out_y = attn(x, is_causal=True), attn(y, is_causal=True)
    torch.testing.assert_close(out_x[:, :4], out_y[:, :4])
    assert not torch.allclose(out_x[:, 4:], out_y[:, 4:])


def test_cpu_attention_path_depends_on_dtype_and_keys() -> None:
    def path(dtype: torch.dtype, head_dim: int, keys: int) -> str | None:
        q, k = torch.zeros(1, 1, 4, head_dim, dtype=dtype), torch.zeros(1, 1, keys, head_dim, dtype=dtype)
        return cpu_attention_path(q, k)

    for head_dim in (32, 64):
        assert path(torch.bfloat16, head_dim, 1) == path(torch.bfloat16, head_dim, CPU_ATTENTION_MAX_KEYS) == "matmul"
        assert path(torch.float16, head_dim, CPU_ATTENTION_MAX_KEYS) == "fp32"  # no fast fp16 products on CPUs
        for dtype in (torch.bfloat16, torch.float16):
            assert path(dtype, head_dim, CPU_ATTENTION_MAX_KEYS + 1) is None  # long sequences: the kernel
        assert path(torch.float32, head_dim, 97) is None


def _bf16_case(kind: str, q_len: int = 40, keys: int = 40,
               head_dim: int = 64) -> tuple[list[torch.Tensor], torch.Tensor | None, bool]:
    """bf16 q, k, v `2 2 n d` (leaves) and the mask / causal flag that `Attention` would pass to `attend`."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, q_len, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, keys, head_dim, generator=gen).bfloat16() for _ in range(2))
    keep = torch.ones(2, keys, dtype=torch.long)
    keep[0, keys // 2:] = 0
    mask, causal = {
        "full": (None, False),
        "padded": (make_attn_mask(q_len, keys, keep), False),
        "causal": (make_attn_mask(q_len, keys, is_causal=True), True),
        "padded_causal": (make_attn_mask(q_len, keys, keep, is_causal=True), True),
        "cached_causal": (make_attn_mask(q_len, keys, is_causal=True), True),  # fewer queries than keys
        "additive": (make_attn_mask(q_len, keys, keep, attn_mask=torch.randn(q_len, keys, generator=gen),
                                    dtype=torch.bfloat16), False),
    }[kind]
    return [t.requires_grad_() for t in (q, k, v)], mask, causal


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("kind", ["full", "padded", "causal", "padded_causal", "cached_causal", "additive"])
def test_bf16_attention_by_matmul_matches_the_fp32_kernel(kind: str, head_dim: int) -> None:
    """The matmul path (bf16 products, fp32 softmax) against fp32 SDPA on the same bf16 values: outputs and
    gradients within bf16 rounding (measured 2.7e-3 to 4.6e-3 relative). Its scores and probabilities are rounded to
    bf16 (as autocast attention's are), so its output error is 1.5-1.7x that of torch's bf16 kernel, which keeps
    the scores in fp32 (2.0x with an additive bias): bounded at 2.5x."""
    lo, mask, causal = _bf16_case(kind, q_len=8 if kind == "cached_causal" else 40, head_dim=head_dim)
    assert cpu_attention_path(lo[0], lo[1]) == "matmul"
    grad_out = torch.randn(2, lo[0].shape[2], 2 * head_dim, generator=torch.Generator().manual_seed(1))
    out = attend(*lo, mask, is_causal=causal)
    (out.float() * grad_out).sum().backward()
    got = [out.detach().float()] + [t.grad.float() for t in lo]
    hi = [t.detach().float().requires_grad_() for t in lo]
    fp32_mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    ref_out = attend(*hi, fp32_mask, is_causal=causal)
    (ref_out * grad_out).sum().backward()
    ref = [ref_out.detach()] + [t.grad for t in hi]
    sdpa_causal = causal and mask is None
    kernel = torch.nn.functional.scaled_dot_product_attention(*[t.detach() for t in lo], attn_mask=mask,
                                                               is_causal=sdpa_causal).transpose(1, 2).flatten(2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
    assert (got[0] - ref[0]).abs().mean() <= 2.5 * (kernel.float() - ref[0]).abs().mean()


def test_bf16_attention_by_matmul_gives_zeros_for_a_fully_masked_query() -> None:
    lo, _, _ = _bf16_case("full")
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    mask[1, 0, 3] = False  # query 3 of sample 1 may attend to nothing
    out = attend(*lo, mask)
    out.float().sum().backward()
    assert torch.equal(out[1, 3], torch.zeros(128, dtype=torch.bfloat16))
    assert out[0, 3].abs().sum() > 0 and all(torch.isfinite(t.grad).all() for t in lo)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*[t.detach().float() for t in lo], attn_mask=mask)
    assert torch.equal(sdpa[1, :, 3], torch.zeros(2, 64))  # what SDPA does too


@pytest.mark.parametrize("keys", [CPU_ATTENTION_MAX_KEYS, CPU_ATTENTION_MAX_KEYS + 1])
def test_fp16_attention_on_cpu_runs_in_fp32_up_to_the_threshold(keys: int) -> None:
    """fp16 over short key sequences: the kernel runs on the fp32 upcasts (bitwise what fp32 SDPA then a cast
    gives, and closer to the fp32 result than the fp16 kernel); longer ones keep the fp16 kernel, bitwise. bf16
    beyond the threshold keeps its kernel too."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, keys, 16, generator=gen) for _ in range(3))
    pad = torch.ones(2, keys, dtype=torch.long)
    pad[0, keys // 2:] = 0
    mask = make_attn_mask(keys, keys, pad)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    lo = [t.half() for t in (q, k, v)]
    upcast = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in lo), attn_mask=mask).half()
    in_fp16 = torch.nn.functional.scaled_dot_product_attention(*lo, attn_mask=mask)
    out = attend(*lo, mask)
    assert out.dtype == torch.float16
    expected = upcast if keys <= CPU_ATTENTION_MAX_KEYS else in_fp16
    assert torch.equal(out, expected.transpose(1, 2).flatten(2))
    assert not torch.equal(upcast, in_fp16)  # the two paths are told apart
    if keys <= CPU_ATTENTION_MAX_KEYS:
        assert (upcast.float() - exact).abs().mean() < (in_fp16.float() - exact).abs().mean()
    else:
        bf16 = [t.bfloat16() for t in (q, k, v)]
        kernel = torch.nn.functional.scaled_dot_product_attention(*bf16, attn_mask=mask)
        assert torch.equal(attend(*bf16, mask), kernel.transpose(1, 2).flatten(2))


def test_make_attn_mask_combinations() -> None:
    keep = _keep_mask()
    assert make_attn_mask(N, N) is None
    assert make_attn_mask(N, N, is_causal=True) is None  # SDPA gets is_causal=True instead
    both = make_attn_mask(N, N, keep, is_causal=True)
    assert both is not None and both.dtype == torch.bool and both.shape == (B, 1, N, N)
    assert not both[0, 0, 2, 3] and both[0, 0, 3, 2] and not both[1, 0, 6, 4]
    additive = torch.zeros(N, N)
    merged = make_attn_mask(N, N, keep, attn_mask=additive)
    assert merged is not None and merged.dtype == torch.float32
    assert torch.isinf(merged[1, 0, 0, 5]) and merged[1, 0, 0, 0] == 0


def test_block_and_transformer_shapes_and_residual() -> None:
    torch.manual_seed(0)
    x = torch.randn(B, N, D)
    block = Block(D, H)
    assert block(x).shape == x.shape
    # Zero the output projections: each branch adds 0, so the pre-LN block is the identity (pure residual).
    torch.nn.init.zeros_(block.attn.proj.weight)
    torch.nn.init.zeros_(block.mlp.fc2.weight)
    torch.testing.assert_close(block(x), x)
    stack = Transformer(D, layers=2, heads=H)
    out = stack(x, key_padding_mask=_keep_mask(), is_causal=True)
    assert out.shape == (B, N, D) and torch.isfinite(out).all()
    assert len(stack.blocks) == 2


def test_mlp_ratio_and_injected_ffn() -> None:
    mlp = Mlp(D, mlp_ratio=2.0)
    assert mlp.fc1.out_features == 2 * D and mlp(torch.randn(B, N, D)).shape == (B, N, D)
    custom = Mlp(D, hidden_dim=8)
    block = Block(D, H, mlp=custom)
    assert block.mlp is custom


def test_init_recipe() -> None:
    block = Block(64, 2)
    w = block.mlp.fc1.weight
    assert w.abs().max() <= 0.04 + 1e-7 and 0.01 < w.std() < 0.03
    assert (block.attn.qkv.bias == 0).all() and (block.norm1.weight == 1).all()


def test_patch_embedding_shape_and_patch_order() -> None:
    torch.manual_seed(0)
    images = torch.randn(B, 3, 32, 32)
    pe = PatchEmbedding(image_size=32, patch_size=8, dim=D)
    out = pe(images)
    assert out.shape == (B, 1 + 16, D)
    # The conv equals a Linear over row-major flattened `c p1 p2` patches.
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # b c gh gw p1 p2
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, 16, 3 * 64)
    want = patches @ pe.proj.weight.reshape(D, -1).T + pe.proj.bias + pe.pos_embed[:, 1:]
    torch.testing.assert_close(out[:, 1:], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0], (pe.cls_token + pe.pos_embed[:, :1]).expand(B, 1, D)[:, 0])
    assert PatchEmbedding(32, 8, D, cls_token=False)(images).shape == (B, 16, D)
    with pytest.raises(ValueError, match="expected 32x32"):
        pe(torch.randn(1, 3, 64, 64))


def test_text_embedding() -> None:
    te = TextEmbedding(vocab_size=50, max_len=8, dim=D)
    assert te(torch.randint(0, 50, (B, 5))).shape == (B, 5, D)
    with pytest.raises(ValueError, match="max_text_len"):
        te(torch.randint(0, 50, (B, 9)))


def test_towers_and_heads() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=D, layers=2, heads=H)
    tokens = vit(torch.randn(B, 3, 32, 32))
    assert tokens.shape == (B, 17, D) and vit.num_tokens == 17
    # Final LayerNorm (ones/zeros at init): every token is standardised.
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(B, 17), atol=1e-5, rtol=0)
    txt = TextTransformer(vocab_size=50, max_len=8, width=D, layers=2, heads=H)
    ids, keep = torch.randint(0, 50, (B, 6)), torch.ones(B, 6, dtype=torch.long)
    assert txt(ids, keep).shape == (B, 6, D)
    head = ProjectionHead(D, 16)
    z = l2_normalize(head(tokens[:, 0]))
    assert z.shape == (B, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(B))


def test_transformer_flops_formula() -> None:
    t = Transformer(D, layers=2, heads=H, mlp_ratio=4.0)
    n = 10
    assert t.matmul_params() == 2 * 12 * D * D
    assert t.flops(n) == 6 * 2 * 12 * D * D * n + 12 * 2 * n * n * D


def test_no_weight_decay_convention() -> None:
    vit = VisionTransformer(image_size=32, patch_size=8, width=D, layers=1, heads=H)
    names = no_weight_decay_names(vit)
    assert {"patch_embed.pos_embed", "patch_embed.cls_token", "norm.weight", "norm.bias"} <= names
    assert "transformer.blocks.0.attn.qkv.bias" in names and "transformer.blocks.0.norm1.weight" in names
    assert "transformer.blocks.0.attn.qkv.weight" not in names and "patch_embed.proj.weight" not in names
