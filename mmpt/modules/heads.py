"""Heads on top of tower outputs: projection into the shared embedding space, L2 normalisation, the ITM
classifier and the vocabulary heads for masked (MLM) and causal (captioning) language modelling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.modules.block import init_weights_


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """Unit-norm along `dim`, so that a dot product is a cosine similarity (the ITC logits' bound).

    eps is large enough to stay representable in bf16/fp16 (F.normalize's 1e-12 underflows in fp16).
    """
    return F.normalize(x, dim=dim, eps=eps)


class ProjectionHead(nn.Module):
    """`b d -> b e`: a Linear into the shared embedding space, bias-free by default as in OpenAI CLIP."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def flops_per_sample(self) -> float:
        """Training FLOPs for one pooled vector: 6 * weights."""
        return 6.0 * self.proj.weight.numel()


class ITMHead(nn.Module):
    """`b d -> b 2`: image-text matching logits (index 1 = matched) from the fusion encoder's [CLS]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def flops_per_sample(self) -> float:
        """Training FLOPs for one pooled vector: 6 * weights."""
        return 6.0 * self.fc.weight.numel()


class MLMHead(nn.Module):
    """`b n d -> b n vocab`: [dense -> GELU -> LayerNorm ->] vocabulary projection (+ its own bias).

    With `word_embeddings` the projection's weight IS the embedding's Parameter (BERT/ALBEF weight tying:
    one matrix, gradients from both uses accumulate in it); without, it is an untied Linear. The BERT
    transform (`transform=True`) is what MLM uses; a decoder whose tower ends in a LayerNorm (CoCa) goes
    straight to the projection, see `LMHead`. Parameter names: `transform.*`, `norm.*`, `decoder.weight`
    (tied or not) and `bias` (1-d, never decayed).
    """

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        word_embeddings: nn.Embedding | None = None,
        transform: bool = True,
        bias: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.transform: nn.Linear | None = nn.Linear(dim, dim) if transform else None
        self.act = nn.GELU() if transform else nn.Identity()
        self.norm: nn.Module = nn.LayerNorm(dim, eps=norm_eps) if transform else nn.Identity()
        self.register_parameter("bias", nn.Parameter(torch.zeros(vocab_size)) if bias else None)
        self.tied = word_embeddings is not None
        # A tied projection starts on meta (no throwaway vocab x dim copy) and gets the embedding's weight
        # after init, so initialising the head never re-draws the shared embedding.
        self.decoder = nn.Linear(dim, vocab_size, bias=False, device="meta" if self.tied else None)
        init_weights_(self)
        if word_embeddings is not None:
            self.tie_(word_embeddings)

    def tie_(self, word_embeddings: nn.Embedding) -> None:
        """Share `word_embeddings.weight` as the projection weight (same Parameter). Also call it again after
        `Module.to_empty()` (materialising a meta-built model), which gives each module its own copy."""
        vocab_size, dim = self.decoder.out_features, self.decoder.in_features
        if tuple(word_embeddings.weight.shape) != (vocab_size, dim):
            raise ValueError(
                f"tied word embeddings are {tuple(word_embeddings.weight.shape)}, expected (vocab_size, dim) = {(vocab_size, dim)}"
            )
        self.decoder.weight = word_embeddings.weight
        self.tied = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `b n d` (or `b d`) -> logits `b n vocab`."""
        if self.transform is not None:
            x = self.norm(self.act(self.transform(x)))
        logits = self.decoder(x)
        return logits + self.bias if self.bias is not None else logits

    def flops(self, num_tokens: float) -> float:
        """Training FLOPs for `num_tokens` predicted tokens (only gather the positions you score): 6 * weights each."""
        weights = self.decoder.weight.numel() + (self.transform.weight.numel() if self.transform is not None else 0)
        return 6.0 * weights * num_tokens


class LMHead(MLMHead):
    """Captioning head, `b n d -> b n vocab`: the same class with CoCa's defaults, a plain untied, bias-free
    projection of the decoder's final-LayerNorm output (as in open_clip's coca_*; pass `word_embeddings`
    to tie it instead)."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        word_embeddings: nn.Embedding | None = None,
        transform: bool = False,
        bias: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(dim, vocab_size, word_embeddings, transform=transform, bias=bias, norm_eps=norm_eps)
