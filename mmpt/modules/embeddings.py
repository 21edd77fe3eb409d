"""Input embeddings: image patches (+ [CLS]) and text tokens, each with learned position embeddings.

Parameter names `pos_embed` and `cls_token` are a contract: `init_weights_` initialises them and
`no_weight_decay_names` keeps them out of weight decay.
"""
from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from mmpt.modules.block import init_weights_


class PatchEmbedding(nn.Module):
    """Images `b c h w` -> tokens `b (1 + n) d` ([CLS] first) or `b n d`, n = (h/p) * (w/p).

    A stride-p convolution is the same as a Linear on flattened p x p patches (`b (gh gw) (c p1 p2)`),
    but runs as one well-tuned kernel. Position embeddings are learned at a fixed `image_size`; a different
    input size is an error rather than a silent interpolation.

    `mask_token=True` adds a learned [MASK] patch embedding for BEiT-style masked image modeling:
    `forward(images, patch_mask)` replaces the masked patches' embeddings by it before positions are added,
    so the model still knows where each hidden patch is.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        in_chans: int = 3,
        cls_token: bool = True,
        bias: bool = True,
        mask_token: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        self.num_tokens = self.num_patches + (1 if cls_token else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        init_weights_(self)

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images `b c h w`; patch_mask `b n` bool (True = replace that patch by [MASK]), n = num_patches."""
        h, w = images.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {h}x{w}")
        x = rearrange(self.proj(images), "b d gh gw -> b (gh gw) d")
        if patch_mask is not None:
            x = self._apply_mask(x, patch_mask)
        if self.cls_token is not None:
            x = torch.cat([repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0]), x], dim=1)
        return x + self.pos_embed

    def _apply_mask(self, x: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """`b n d` patch embeddings with the masked ones replaced by [MASK] (exact replacement, no blending)."""
        if self.mask_token is None:
            raise ValueError(
                "a patch_mask was given but this PatchEmbedding has no [MASK] token: build it with mask_token=True"
            )
        if patch_mask.dtype != torch.bool or tuple(patch_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"patch_mask must be a bool tensor of shape (batch, num_patches) = {tuple(x.shape[:2])} "
                f"(True = masked patch), got {patch_mask.dtype} {tuple(patch_mask.shape)}"
            )
        return torch.where(rearrange(patch_mask, "b n -> b n 1"), self.mask_token.to(x.dtype), x)


class TextEmbedding(nn.Module):
    """Token ids `b l` -> `b l d`: token embedding + learned absolute position embedding (l <= max_len).

    `norm=True` adds a LayerNorm on the sum, before dropout: BERT's embedding layout, needed by post-LN
    towers whose blocks expect a normalised input (BERT's token-type-0 vector is folded into `pos_embed`
    when such weights are loaded, see mmpt/models/pretrained.py).
    """

    def __init__(
        self, vocab_size: int, max_len: int, dim: int, dropout: float = 0.0, norm: bool = False, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.norm: nn.LayerNorm | None = nn.LayerNorm(dim, eps=norm_eps) if norm else None
        self.drop = nn.Dropout(dropout)
        init_weights_(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds max_text_len={self.max_len}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :length]
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)
