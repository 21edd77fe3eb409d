"""Multiway transformer (VLMo's Mixture-of-Modality-Experts, BEiT-3): self-attention over the whole sequence,
then a feed-forward expert chosen by modality.

Token layout, everywhere: image tokens first, then text tokens. `split` is the number of leading image tokens
(image-only pass: split = n; text-only pass: split = 0; fused pass: split = image tokens). Inside the stack the
two modalities travel as separate tensors (`Streams`: image tokens, text tokens; an absent side is None): every
norm, projection and expert runs on its own side, and the sequence is joined only where tokens meet, for the
joint softmax of each attention (one concatenation per block, and one split of its output). An empty side is
skipped entirely, so a unimodal pass runs exactly one expert and the others get no gradient (VLMo's stagewise
training relies on it). Keeping the sides apart instead of slicing one `b n d` tensor at every expert saves the
slices' backward (a zero-filled full-size gradient per slice) and two concatenations per block.

Two attention layouts:
- shared (VLMo paper, BEiT-3 paper): one pre-norm `attn_norm` + one `Attention` for all tokens;
- decoupled (released BEiT-3, torchscale `multiway=True`): per-modality pre-norm, q/k/v and output projections
  (`attn.norm_v/attn.v` for images, `attn.norm_l/attn.l` for text), one joint softmax over the whole sequence.

Parameter names are a contract for freezing patterns (fnmatch over `named_parameters()`):
`*.attn_norm.*` / `*.attn.*` attention, `*.ffn_v.*` V-FFN, `*.ffn_l.*` L-FFN, `*.ffn_vl.*` VL-FFN; each expert
holds its own pre-norm (`ffn_v.norm`) and its `Mlp` (`ffn_v.mlp`). Keep the dots: `ffn_v*` also matches `ffn_vl`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from mmpt.modules.attention import Attention, attend, make_attn_mask
from mmpt.modules.block import init_weights_
from mmpt.modules.checkpointing import run_block
from mmpt.modules.mlp import Mlp


Streams = tuple[torch.Tensor | None, torch.Tensor | None]  # (image tokens `b n_i d`, text tokens `b n_t d`)


def split_streams(x: torch.Tensor, split: int) -> Streams:
    """`b n d` -> (`x[:, :split]`, `x[:, split:]`), an empty side None; one split op, whose backward is one cat."""
    n = x.shape[1]
    if split >= n:
        return x, None
    if split <= 0:
        return None, x
    image, text = x.split([split, n - split], dim=1)
    return image, text


def join_streams(xs: Streams) -> torch.Tensor:
    """(image tokens, text tokens) -> `b n d`, image tokens first."""
    image, text = xs
    if image is None or text is None:
        present = image if image is not None else text
        assert present is not None, "Streams with neither side"
        return present
    return torch.cat([image, text], dim=1)


def _image_len(xs: Streams) -> int:
    """Image tokens in `xs`: where the joined sequence splits."""
    return 0 if xs[0] is None else xs[0].shape[1]


def route(xs: Streams, image_fn: Callable[[torch.Tensor], torch.Tensor],
          text_fn: Callable[[torch.Tensor], torch.Tensor]) -> Streams:
    """image_fn on the image side, text_fn on the text side; an absent side never runs.

    The one routing primitive of the module (experts, per-modality norms and projections, final norms), so a
    unimodal pass touches one side's weights only."""
    image, text = xs
    return (None if image is None else image_fn(image), None if text is None else text_fn(text))


def _add_residual(xs: Streams, hs: Streams, gamma: torch.Tensor | None) -> Streams:
    """x + gamma * h on each present side (LayerScale when gamma is given)."""
    return tuple(None if x is None else x + (h * gamma if gamma is not None else h)  # type: ignore[return-value]
                 for x, h in zip(xs, hs))


def check_split(split: int, n: int, where: str) -> None:
    """A clear error for a split outside [0, n] (a Python int check: no host sync)."""
    if not isinstance(split, int) or isinstance(split, bool) or not 0 <= split <= n:
        raise ValueError(
            f"{where}: split={split!r} must be an int in [0, {n}] (the number of leading image tokens of the "
            f"{n}-token sequence: n for image-only, 0 for text-only)"
        )


class Expert(nn.Module):
    """One modality's feed-forward branch, `b n d -> b n d`: its own pre-LayerNorm, then an `Mlp`.

    Each expert normalises its own input (VLMo layout), so freezing V-FFN freezes its norm with it and a
    text-only stage can adapt the L-FFN's normalisation without touching the image path.
    """

    def __init__(
        self, dim: int, hidden_dim: int, dropout: float = 0.0, norm_eps: float = 1e-5, sub_norm: bool = False
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_dim=hidden_dim, dropout=dropout, inner_norm=sub_norm, norm_eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


class DecoupledAttention(nn.Module):
    """Released BEiT-3 attention, `b n d -> b n d`: per-modality pre-norm and q/k/v/out projections, joint softmax.

    Image rows go through `norm_v` and `v` (an `Attention` whose `qkv`/`proj` are the vision copies), text
    rows through `norm_l` and `l`; the keys/values of both sides are then attended to jointly, so modalities
    still mix in every layer. `sub_norm=True` adds torchscale's Sub-LN before each output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        sub_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm_v = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_l = nn.LayerNorm(dim, eps=norm_eps)
        self.v = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.l = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.sub_norm_v: nn.LayerNorm | None = nn.LayerNorm(dim, eps=norm_eps) if sub_norm else None
        self.sub_norm_l: nn.LayerNorm | None = nn.LayerNorm(dim, eps=norm_eps) if sub_norm else None

    def _qkv_v(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.qkv(self.norm_v(x))

    def _qkv_l(self, x: torch.Tensor) -> torch.Tensor:
        return self.l.qkv(self.norm_l(x))

    def _out_v(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.proj_drop(self.v.proj(self.sub_norm_v(x) if self.sub_norm_v is not None else x))

    def _out_l(self, x: torch.Tensor) -> torch.Tensor:
        return self.l.proj_drop(self.l.proj(self.sub_norm_l(x) if self.sub_norm_l is not None else x))

    def forward(self, xs: Streams, attn_mask: torch.Tensor | None = None) -> Streams:
        """xs: the two sides (not normalised: the norms are per modality); attn_mask: broadcastable to `b h n n`
        over the joined sequence."""
        qkv = join_streams(route(xs, self._qkv_v, self._qkv_l))  # b n 3d
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.v.num_heads)
        out = attend(q, k, v, attn_mask, dropout_p=self.v.attn_dropout if self.training else 0.0)
        return route(split_streams(out, _image_len(xs)), self._out_v, self._out_l)


class MultiwayBlock(nn.Module):
    """Pre-LN Multiway block on `Streams` (image tokens, text tokens): x + attn(x); x + expert(x) per side.

    `forward(xs, vl=False)`: image tokens go to `ffn_v`, text tokens to `ffn_l`; with
    `vl=True` every token goes to `ffn_vl` (only blocks built with `vl_expert=True` have one: VLMo's top
    layers in a fused pass). `layer_scale` (BEiT/VLMo use 0.1) multiplies each residual branch by a learned
    per-channel `gamma_*`, which keeps early training of deep pre-LN stacks stable.

    Not a subclass of `Block`: its FFN norm belongs to each expert and the decoupled layout has two attention
    norms, so `Block`'s norm1/norm2/mlp slots would be dead weight; the pieces (`Attention`, `Mlp`,
    `init_weights_`) are the shared ones.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_dim: int | None = None,
        vl_expert: bool = False,
        decoupled_attention: bool = False,
        sub_norm: bool = False,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        if sub_norm and not decoupled_attention:
            raise ValueError(
                "sub_norm=True is the released BEiT-3 (torchscale Sub-LN) layout and needs decoupled_attention=True"
            )
        self.decoupled_attention = decoupled_attention
        self.attn_norm: nn.LayerNorm | None = None
        self.attn: Attention | DecoupledAttention
        if decoupled_attention:
            self.attn = DecoupledAttention(dim, num_heads, qkv_bias, attn_dropout, dropout, norm_eps, sub_norm)
        else:
            self.attn_norm = nn.LayerNorm(dim, eps=norm_eps)
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout)
        hidden = ffn_dim if ffn_dim is not None else int(dim * mlp_ratio)
        self.ffn_v = Expert(dim, hidden, dropout, norm_eps, sub_norm)
        self.ffn_l = Expert(dim, hidden, dropout, norm_eps, sub_norm)
        self.ffn_vl: Expert | None = Expert(dim, hidden, dropout, norm_eps, sub_norm) if vl_expert else None
        self.gamma_attn: nn.Parameter | None = None
        self.gamma_ffn: nn.Parameter | None = None
        if layer_scale is not None:
            self.gamma_attn = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_ffn = nn.Parameter(torch.full((dim,), float(layer_scale)))
        init_weights_(self)

    def forward(self, xs: Streams, vl: bool = False, attn_mask: torch.Tensor | None = None) -> Streams:
        """xs: (image tokens, text tokens), either None when absent; attn_mask: broadcastable to `b h n n` over the
        joined sequence, image tokens first (True = may attend; `MultiwayTransformer` builds it once)."""
        if vl and self.ffn_vl is None:
            raise ValueError("vl=True needs a block built with vl_expert=True (only the top vl_layers have a VL-FFN)")
        if isinstance(self.attn, DecoupledAttention):
            h = self.attn(xs, attn_mask)
        else:
            assert self.attn_norm is not None
            h = split_streams(self.attn(self.attn_norm(join_streams(xs)), attn_mask=attn_mask), _image_len(xs))
        xs = _add_residual(xs, h, self.gamma_attn)
        # VL-FFN is per token: running it on each side equals running it on the joined sequence
        h = route(xs, self.ffn_vl, self.ffn_vl) if vl and self.ffn_vl is not None else route(xs, self.ffn_v, self.ffn_l)
        return _add_residual(xs, h, self.gamma_ffn)


class MultiwayTransformer(nn.Module):
    """A stack of `MultiwayBlock`s, `b n d -> b n d` (no final norm: the encoder owns it).

    The top `vl_layers` blocks own a VL expert. In a fused pass (`fused=True`: image + text tokens) those
    blocks send every token through VL-FFN and the lower ones route by modality; in a unimodal pass every
    block routes by modality, the top ones included (VLMo's dual encoder for ITC uses V-FFN / L-FFN all the
    way up). With vl_layers=0 (released BEiT-3) a fused pass routes by modality in every block. The first
    `checkpoint_blocks` blocks run under activation checkpointing in training (mmpt/modules/checkpointing.py).
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        vl_layers: int = 0,
        decoupled_attention: bool = False,
        ffn_dim: int | None = None,
        sub_norm: bool = False,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= vl_layers <= layers:
            raise ValueError(f"vl_layers={vl_layers} must be in [0, layers={layers}] (the top blocks owning a VL-FFN)")
        self.width = width
        self.vl_start = layers - vl_layers
        self.checkpoint_blocks = 0  # `model.activation_checkpointing` (mmpt/modules/checkpointing.py)
        self.blocks = nn.ModuleList(
            MultiwayBlock(
                width,
                heads,
                mlp_ratio,
                ffn_dim,
                vl_expert=i >= self.vl_start,
                decoupled_attention=decoupled_attention,
                sub_norm=sub_norm,
                qkv_bias=qkv_bias,
                dropout=dropout,
                attn_dropout=attn_dropout,
                norm_eps=norm_eps,
                layer_scale=layer_scale,
            )
            for i in range(layers)
        )

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, split: int, fused: bool = False
    ) -> torch.Tensor:
        """x: `b n d`, image tokens first; key_padding_mask: `b n` (1 = real token) or None; split: the number
        of leading image tokens; fused: an image+text pass (the top vl_layers use VL-FFN)."""
        check_split(split, x.shape[1], "MultiwayTransformer")
        return join_streams(self.forward_streams(split_streams(x, split), key_padding_mask, fused))

    def forward_streams(self, xs: Streams, key_padding_mask: torch.Tensor | None, fused: bool = False) -> Streams:
        """`forward` on the two sides kept apart (what `MultiwayEncoder` calls: its embeddings come apart, and
        its final norms are per side); key_padding_mask covers the joined sequence, image tokens first."""
        present = [t for t in xs if t is not None]
        if not present:
            raise ValueError("MultiwayTransformer needs image tokens, text tokens or both; got neither")
        b, n = present[0].shape[0], sum(t.shape[1] for t in present)
        if fused and len(present) != 2:
            raise ValueError(
                f"fused=True needs image and text tokens (0 < split < n), got split={_image_len(xs)}, n={n}; "
                "use fused=False for an image-only or text-only pass"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(
                f"key_padding_mask must be `b n` = {(b, n)} covering image and text tokens (1 = real token), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        mask = make_attn_mask(n, n, key_padding_mask, dtype=present[0].dtype, device=present[0].device)
        for i, block in enumerate(self.blocks):
            xs = run_block(block, i < self.checkpoint_blocks, xs, vl=fused and i >= self.vl_start, attn_mask=mask)
        return xs

    def matmul_params_per_token(self) -> int:
        """Linear weights one token meets on its way up: one attention copy and one expert per block
        (every expert has the same size, so routing does not change the count)."""
        total = 0
        for block in self.blocks:
            attn = block.attn.v if isinstance(block.attn, DecoupledAttention) else block.attn
            total += attn.qkv.weight.numel() + attn.proj.weight.numel()
            total += block.ffn_v.mlp.fc1.weight.numel() + block.ffn_v.mlp.fc2.weight.numel()
        return total

    def flops(self, num_tokens: int) -> float:
        """Training (forward + backward) FLOPs for one sequence: 6 * P_token * n + 12 * L * n^2 * d, as
        `Transformer.flops` counts them (weights x3 for backward, attention scores and weighted values)."""
        n = num_tokens
        return 6.0 * self.matmul_params_per_token() * n + 12.0 * len(self.blocks) * n * n * self.width
