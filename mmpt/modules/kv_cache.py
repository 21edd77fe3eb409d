"""Key/value caches for incremental (token-by-token) decoding with a causal `Transformer`.

Why: without a cache every generated token re-runs the whole prefix through every layer (O(T^2) token
passes for T tokens). With one, a step feeds only the new token(s): self-attention appends their keys and
values to what earlier steps stored, and cross-attention projects the fixed context (image tokens) once,
on the first step, and reuses it afterwards.

The objects are plain dataclasses holding tensors; they carry no masks. Masks are always passed by the
caller and always cover every key (cached + new), the same convention as a full forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys and values of one attention layer, `b h t d` each; empty (None) until first use."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached key positions `t`."""
        return 0 if self.k is None else self.k.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention: add this step's `b h n d` keys/values after the cached ones; return all `b h (t+n) d`.

        A concatenation per step (no pre-allocated buffer) keeps the cache free of a maximum length; for
        caption-length sequences the copy is negligible next to the layer's matmuls.
        """
        if self.k is not None and self.v is not None:
            k = torch.cat([self.k, k], dim=-2)
            v = torch.cat([self.v, v], dim=-2)
        self.k, self.v = k, v
        return k, v


@dataclass
class LayerCache:
    """What one `Block` keeps between decoding steps: its self-attention history and the context's k/v."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


@dataclass
class TransformerCache:
    """One `LayerCache` per block of a `Transformer`; create it with `Transformer.new_cache()`."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, num_layers: int) -> TransformerCache:
        return cls([LayerCache() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        """Tokens processed so far = the position index of the next token (its position embedding offset)."""
        return self.layers[0].self_attn.length if self.layers else 0
