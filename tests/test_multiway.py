"""Multiway / MoME transformer: routing against hand-written references, expert isolation (outputs and
gradients), decoupled attention, padding, and the shared encoder's three passes."""
from __future__ import annotations

import math
from fnmatch import fnmatchcase

import pytest
import torch
import torch.nn.functional as F

from mmpt.modules.block import init_weights_, no_weight_decay_names
from mmpt.modules.mlp import Mlp
from mmpt.modules.multiway import (DecoupledAttention, MultiwayBlock, MultiwayTransformer, join_streams, route,
                                   split_streams)
from mmpt.modules.multiway_encoder import MultiwayEncoder

B, N, SPLIT, D, H = 2, 7, 3, 32, 4
EXPERTS = ("ffn_v", "ffn_l", "ffn_vl")


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large weights and non-trivial norms/biases, in float64 and eval mode: routing mistakes then move
    outputs far beyond round-off."""
    torch.manual_seed(seed)
    init_weights_(module, std=0.2)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return module.double().eval()


def _block(**kwargs: object) -> MultiwayBlock:
    return _randomise(MultiwayBlock(D, H, mlp_ratio=2.0, vl_expert=True, **kwargs))  # type: ignore[arg-type]


def _joint(module: torch.nn.Module, x: torch.Tensor, split: int, *args: object, **kwargs: object) -> torch.Tensor:
    """A block or decoupled attention (which take `Streams`) on a joint `b n d` sequence with `split` image tokens."""
    return join_streams(module(split_streams(x, split), *args, **kwargs))


def _x(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def _joint_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, keep: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v per head with plain reshapes (no einops, no SDPA): `b n d` each -> `b n d`."""
    b, n, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if keep is not None:
        scores = scores.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


# ----------------------------------------------------------------------------------------------- routing


def test_route_applies_each_side_and_skips_an_empty_one() -> None:
    x = _x()
    calls: list[int] = []

    def image_fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[1])
        return t * 2

    def text_fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(-t.shape[1])
        return t - 1

    routed = join_streams(route(split_streams(x, SPLIT), image_fn, text_fn))
    torch.testing.assert_close(routed, torch.cat([x[:, :SPLIT] * 2, x[:, SPLIT:] - 1], 1))
    assert calls == [SPLIT, -(N - SPLIT)]
    calls.clear()
    assert split_streams(x, N)[1] is None and split_streams(x, 0)[0] is None
    route(split_streams(x, N), image_fn, text_fn)
    route(split_streams(x, 0), image_fn, text_fn)
    assert calls == [N, -N]


def test_split_streams_backward_is_the_gradient_of_each_side() -> None:
    x = _x().requires_grad_()
    image, text = split_streams(x, SPLIT)
    assert image is not None and text is not None
    (image.sum() * 2 + text.sum() * 3).backward()
    assert x.grad is not None
    assert (x.grad[:, :SPLIT] == 2).all() and (x.grad[:, SPLIT:] == 3).all()


@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_block_matches_reference_routing(layer_scale: float | None) -> None:
    block = _block(layer_scale=layer_scale)
    if layer_scale is not None:
        with torch.no_grad():
            block.gamma_attn.uniform_(0.2, 1.0)  # type: ignore[union-attr]
            block.gamma_ffn.uniform_(0.2, 1.0)  # type: ignore[union-attr]
    g1 = block.gamma_attn if layer_scale is not None else 1.0
    g2 = block.gamma_ffn if layer_scale is not None else 1.0
    x = _x()

    def expert(name: str, t: torch.Tensor) -> torch.Tensor:
        e = getattr(block, name)
        t = F.layer_norm(t, (D,), e.norm.weight, e.norm.bias, e.norm.eps)
        return F.linear(F.gelu(F.linear(t, e.mlp.fc1.weight, e.mlp.fc1.bias)), e.mlp.fc2.weight, e.mlp.fc2.bias)

    with torch.no_grad():
        h = x + g1 * block.attn(block.attn_norm(x))  # type: ignore[misc]
        routed = torch.cat([expert("ffn_v", h[:, :SPLIT]), expert("ffn_l", h[:, SPLIT:])], 1)
        torch.testing.assert_close(_joint(block, x, SPLIT), h + g2 * routed)
        torch.testing.assert_close(_joint(block, x, N), h + g2 * expert("ffn_v", h))
        torch.testing.assert_close(_joint(block, x, 0), h + g2 * expert("ffn_l", h))
        torch.testing.assert_close(_joint(block, x, SPLIT, vl=True), h + g2 * expert("ffn_vl", h))


@pytest.mark.parametrize(
    ("split", "vl", "moves"),
    [
        (SPLIT, False, {"ffn_v": "image", "ffn_l": "text", "ffn_vl": "none"}),
        (N, False, {"ffn_v": "all", "ffn_l": "none", "ffn_vl": "none"}),
        (0, False, {"ffn_v": "none", "ffn_l": "all", "ffn_vl": "none"}),
        (SPLIT, True, {"ffn_v": "none", "ffn_l": "none", "ffn_vl": "all"}),
    ],
)
def test_perturbing_an_expert_moves_only_its_tokens(split: int, vl: bool, moves: dict[str, str]) -> None:
    x = _x()
    for name, where in moves.items():
        block = _block()
        with torch.no_grad():
            before = _joint(block, x, split, vl=vl)
            _perturb(getattr(block, name))
            changed = (_joint(block, x, split, vl=vl) - before).abs().amax(dim=(0, 2)) > 1e-6  # `n`
        expected = torch.zeros(N, dtype=torch.bool)
        if where == "image":
            expected[:split] = True
        elif where == "text":
            expected[split:] = True
        elif where == "all":
            expected[:] = True
        assert torch.equal(changed, expected), f"{name} (split={split}, vl={vl}) moved tokens {changed.tolist()}"


def _expert_calls(stack: MultiwayTransformer) -> tuple[list[tuple[int, str, int]], list[object]]:
    """Record (block index, expert, tokens) for every expert call."""
    calls: list[tuple[int, str, int]] = []
    handles = []
    for i, block in enumerate(stack.blocks):
        for name in EXPERTS:
            expert = getattr(block, name)
            if expert is not None:
                hook = (lambda i, name: lambda m, args: calls.append((i, name, args[0].shape[1])))(i, name)
                handles.append(expert.register_forward_pre_hook(hook))
    return calls, handles


def test_stack_uses_vl_ffn_only_in_fused_top_layers() -> None:
    stack = _randomise(MultiwayTransformer(D, layers=3, heads=H, mlp_ratio=2.0, vl_layers=1))
    assert [b.ffn_vl is not None for b in stack.blocks] == [False, False, True]
    calls, _ = _expert_calls(stack)
    x = _x()
    stack(x, None, SPLIT, fused=True)
    low = [(i, e, n) for i in (0, 1) for e, n in (("ffn_v", SPLIT), ("ffn_l", N - SPLIT))]
    assert calls == [*low, (2, "ffn_vl", SPLIT), (2, "ffn_vl", N - SPLIT)]  # VL-FFN is per token: run per side
    calls.clear()
    stack(x, None, N)  # image-only: V-FFN everywhere, the top block included (dual-encoder ITC)
    assert calls == [(i, "ffn_v", N) for i in range(3)]
    calls.clear()
    stack(x, None, 0)
    assert calls == [(i, "ffn_l", N) for i in range(3)]


def _grad_state(stack: MultiwayTransformer) -> dict[str, str]:
    """`<block>.<attn|ffn_v|ffn_l|ffn_vl>` -> "none" (no parameter has a .grad), "nonzero" (one has a
    non-zero .grad) or "zero". The attention LayerNorm counts with the attention."""
    state: dict[str, str] = {}
    for name, p in stack.named_parameters():
        _, i, part = name.split(".")[:3]  # blocks.<i>.<part>...
        key = f"{i}.{part if part in EXPERTS else 'attn'}"
        now = "none" if p.grad is None else ("nonzero" if bool(p.grad.abs().sum() > 0) else "zero")
        prev = state.get(key, "none")
        state[key] = "nonzero" if "nonzero" in (prev, now) else ("zero" if "zero" in (prev, now) else "none")
    return state


@pytest.mark.parametrize(
    ("split", "fused", "used"),
    [
        (N, False, {"0.attn", "1.attn", "0.ffn_v", "1.ffn_v"}),
        (0, False, {"0.attn", "1.attn", "0.ffn_l", "1.ffn_l"}),
        (SPLIT, True, {"0.attn", "1.attn", "0.ffn_v", "0.ffn_l", "1.ffn_vl"}),
    ],
)
def test_gradients_reach_only_the_experts_used(split: int, fused: bool, used: set[str]) -> None:
    stack = _randomise(MultiwayTransformer(D, layers=2, heads=H, mlp_ratio=2.0, vl_layers=1))
    stack(_x(), None, split, fused=fused).sum().backward()
    state = _grad_state(stack)
    assert set(state) == {"0.attn", "1.attn", "0.ffn_v", "0.ffn_l", "1.ffn_v", "1.ffn_l", "1.ffn_vl"}
    assert state == {key: "nonzero" if key in used else "none" for key in state}


# ----------------------------------------------------------------------------------------- decoupled attention


def test_decoupled_attention_matches_reference() -> None:
    attn = _randomise(DecoupledAttention(D, H, sub_norm=True))
    x = _x()
    keep = torch.ones(B, N, dtype=torch.long)
    keep[0, 5:] = 0
    xv = F.layer_norm(x[:, :SPLIT], (D,), attn.norm_v.weight, attn.norm_v.bias, attn.norm_v.eps)
    xl = F.layer_norm(x[:, SPLIT:], (D,), attn.norm_l.weight, attn.norm_l.bias, attn.norm_l.eps)
    qkv = torch.cat([F.linear(xv, attn.v.qkv.weight, attn.v.qkv.bias), F.linear(xl, attn.l.qkv.weight, attn.l.qkv.bias)], 1)
    q, k, v = qkv.split(D, dim=-1)
    out = _joint_attention_ref(q, k, v, H, keep)
    sv, sl = attn.sub_norm_v, attn.sub_norm_l
    ov = F.linear(F.layer_norm(out[:, :SPLIT], (D,), sv.weight, sv.bias, sv.eps), attn.v.proj.weight, attn.v.proj.bias)
    ol = F.linear(F.layer_norm(out[:, SPLIT:], (D,), sl.weight, sl.bias, sl.eps), attn.l.proj.weight, attn.l.proj.bias)
    mask = keep.bool()[:, None, None, :]
    with torch.no_grad():
        torch.testing.assert_close(_joint(attn, x, SPLIT, mask), torch.cat([ov, ol], 1))


def test_decoupled_text_side_does_not_touch_image_only_outputs() -> None:
    block = _block(decoupled_attention=True, sub_norm=True)
    assert block.attn_norm is None and isinstance(block.attn, DecoupledAttention)
    x = _x()
    with torch.no_grad():
        image_only, fused = _joint(block, x, N), _joint(block, x, SPLIT)
        for side in (block.attn.l, block.attn.norm_l, block.attn.sub_norm_l):
            _perturb(side)
        torch.testing.assert_close(_joint(block, x, N), image_only, rtol=0, atol=0)
        # ...while in a fused pass image tokens attend to the (now different) text keys/values: joint attention
        assert (_joint(block, x, SPLIT)[:, :SPLIT] - fused[:, :SPLIT]).abs().amax() > 1e-3


def test_decoupled_image_only_pass_gives_no_gradient_to_text_attention() -> None:
    stack = _randomise(MultiwayTransformer(D, 2, H, mlp_ratio=2.0, decoupled_attention=True, sub_norm=True))
    stack(_x(), None, N).sum().backward()
    grads = {n: p.grad is not None for n, p in stack.named_parameters()}
    text_side = {n for n in grads if ".attn.l." in n or "norm_l" in n or ".ffn_l." in n}
    assert text_side and not any(grads[n] for n in text_side)
    assert all(grads[n] for n in grads if n not in text_side)


def test_mlp_inner_norm_is_sub_ln() -> None:
    mlp = _randomise(Mlp(D, hidden_dim=48, inner_norm=True))
    assert mlp.norm is not None
    x = _x()
    h = F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))
    ref = F.linear(F.layer_norm(h, (48,), mlp.norm.weight, mlp.norm.bias, mlp.norm.eps), mlp.fc2.weight, mlp.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref)


# -------------------------------------------------------------------------------------------------- encoder


def _encoder(**kwargs: object) -> MultiwayEncoder:
    dims: dict[str, object] = dict(
        width=D, layers=2, heads=H, image_size=32, patch_size=8, vocab_size=50, max_text_len=12, mlp_ratio=2.0,
        vl_layers=1, type_embed=True,
    )  # fmt: skip
    dims.update(kwargs)
    return _randomise(MultiwayEncoder(**dims))  # type: ignore[arg-type]


def _text(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 50, (B, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 4:] = 0
    return ids, mask


def _images(seed: int = 3) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("decoupled", [False, True])
def test_encoder_passes_have_the_right_shapes(decoupled: bool) -> None:
    enc = _encoder(decoupled_attention=decoupled, sub_norm=decoupled, vl_layers=0 if decoupled else 1)
    ids, mask = _text()
    assert enc.num_patches == 16 and enc.num_image_tokens == 17
    with torch.no_grad():
        assert enc.encode_image(_images()).shape == (B, 17, D)
        assert enc.encode_text(ids, mask).shape == (B, 9, D)
        assert enc.encode_pair(_images(), ids, mask).shape == (B, 17 + 9, D)


@pytest.mark.parametrize("pair", [False, True])
def test_padding_does_not_change_real_outputs(pair: bool) -> None:
    """A padded batch equals, on its real tokens, each sample run alone without padding."""
    enc = _encoder()
    ids, mask = _text()
    images = _images()
    with torch.no_grad():
        padded = enc.encode_pair(images, ids, mask) if pair else enc.encode_text(ids, mask)
        garbage = ids.masked_fill(mask == 0, 7)  # other ids at padded positions change nothing either
        again = enc.encode_pair(images, garbage, mask) if pair else enc.encode_text(garbage, mask)
        offset = enc.num_image_tokens if pair else 0
        for i in range(B):
            real = int(mask[i].sum())
            one = ids[i : i + 1, :real]
            ones = torch.ones_like(one)
            alone = enc.encode_pair(images[i : i + 1], one, ones) if pair else enc.encode_text(one, ones)
            torch.testing.assert_close(padded[i, : offset + real], alone[0])
            torch.testing.assert_close(again[i, : offset + real], alone[0])


def test_image_mask_replaces_exactly_the_masked_patch_inputs() -> None:
    enc = _encoder()
    seen: list[torch.Tensor] = []
    # the image side of the first block's input: `Streams` (image tokens, text tokens)
    enc.transformer.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach().clone()))
    image_mask = torch.zeros(B, enc.num_patches, dtype=torch.bool)
    image_mask[0, [0, 5, 15]] = True
    image_mask[1, 3] = True
    ids, mask = _text()
    with torch.no_grad():
        enc.encode_image(_images())
        enc.encode_image(_images(), image_mask)
        enc.encode_pair(_images(), ids, mask, image_mask)
    plain, masked, pair = seen
    hidden = torch.cat([torch.zeros(B, 1, dtype=torch.bool), image_mask], dim=1)  # `b (1+n)`, [CLS] never masked
    expected_masked = enc.patch_embed.mask_token[0, 0] + enc.patch_embed.pos_embed[0] + enc.type_embed.weight[0]
    torch.testing.assert_close(masked[~hidden], plain[~hidden], rtol=0, atol=0)
    torch.testing.assert_close(masked[hidden], expected_masked.expand(B, -1, -1)[hidden].detach())
    assert (masked[hidden] - plain[hidden]).abs().amax() > 1e-3
    torch.testing.assert_close(pair[:, : enc.num_image_tokens], masked, rtol=0, atol=0)


def test_mask_token_gets_a_gradient_and_no_weight_decay() -> None:
    enc = _encoder()
    image_mask = torch.zeros(B, enc.num_patches, dtype=torch.bool)
    image_mask[:, 2] = True
    enc.encode_image(_images(), image_mask).sum().backward()
    assert enc.patch_embed.mask_token.grad is not None and enc.patch_embed.mask_token.grad.abs().sum() > 0
    assert "patch_embed.mask_token" in no_weight_decay_names(enc)
    assert "transformer.blocks.0.ffn_v.mlp.fc1.weight" not in no_weight_decay_names(enc)


def test_freezing_patterns_separate_the_experts() -> None:
    names = [n for n, _ in _encoder().named_parameters()]
    v = [n for n in names if fnmatchcase(n, "*.ffn_v.*")]
    vl = [n for n in names if fnmatchcase(n, "*.ffn_vl.*")]
    assert v and vl and not set(v) & set(vl)
    assert all(".ffn_vl." in n for n in vl) and len(vl) == len(v) // 2  # 2 blocks with V-FFN, 1 with VL-FFN
    assert any(fnmatchcase(n, "text_embed.*") for n in names) and any(fnmatchcase(n, "*.attn.*") for n in names)


def test_flops_count_one_attention_copy_and_one_expert_per_token() -> None:
    stack = MultiwayTransformer(D, layers=2, heads=H, ffn_dim=64, vl_layers=1, decoupled_attention=True)
    per_block = 4 * D * D + 2 * D * 64
    assert stack.matmul_params_per_token() == 2 * per_block
    assert stack.flops(10) == 6.0 * 2 * per_block * 10 + 12.0 * 2 * 10 * 10 * D


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_gets_a_clear_error() -> None:
    stack = MultiwayTransformer(D, 2, H, vl_layers=1).double()
    x = _x()
    with pytest.raises(ValueError, match="split=8 must be an int in"):
        stack(x, None, N + 1)
    with pytest.raises(ValueError, match="fused=True needs image and text tokens"):
        stack(x, None, N, fused=True)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        stack(x, torch.ones(B, N - 1), SPLIT)
    with pytest.raises(ValueError, match="vl=True needs a block built with vl_expert=True"):
        stack.blocks[0](split_streams(x, SPLIT), vl=True)
    with pytest.raises(ValueError, match="vl_layers=3 must be in"):
        MultiwayTransformer(D, 2, H, vl_layers=3)
    with pytest.raises(ValueError, match="needs decoupled_attention=True"):
        MultiwayBlock(D, H, sub_norm=True)
    enc = _encoder()
    ids, mask = _text()
    with pytest.raises(ValueError, match="patch_mask must be a bool tensor of shape"):
        enc.encode_image(_images(), torch.zeros(B, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_mask must be a bool tensor"):
        enc.encode_image(_images(), torch.zeros(B, 16))
    with pytest.raises(ValueError, match="input_ids and attention_mask must both be"):
        enc.encode_text(ids, mask[:, :5])
    with pytest.raises(ValueError, match="encode_pair got 1 images but 2 texts"):
        enc.encode_pair(_images()[:1], ids, mask)
