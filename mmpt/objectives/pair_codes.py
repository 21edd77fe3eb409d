"""Int64 codes that say which pairs are "the same" without comparing strings on the host.

Two pairs are duplicates when they share an image id (two captions of one image) or their captions are
identical token for token (web data repeats captions such as "stock photo"; the synthetic demo repeats
"a small red circle" by design). ITM never uses a duplicate as a negative (`objectives/itm.py`); with
`model.contrastive.duplicate_positives` ITC counts duplicates as positives too (`duplicate_mask`), as ALBEF's
retrieval fine-tuning does with image ids. Codes are equal on every rank and every run, so they can be
all-gathered and kept in queues next to the features they describe.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from einops import rearrange

from mmpt.distributed import rank

_TEXT_HASH_SEED = 20261122


def image_id_codes(image_ids: Sequence[str | int], device: torch.device | str | None = None) -> torch.Tensor:
    """Stable int64 codes for image ids: equal on every rank and every run (Python's hash() is salted).

    64-bit blake2b digests: a collision (two images treated as one) has probability ~n^2 / 2^64.
    """
    codes = [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
             for i in image_ids]
    return torch.tensor(codes, dtype=torch.long, device=device)


def text_codes(input_ids: torch.Tensor) -> torch.Tensor:
    """`b l` token ids -> `b` int64 codes, equal for identical rows (a fixed random linear hash, on device,
    no host sync; ids < 2^20 and weights < 2^31 keep every partial sum below 2^63)."""
    gen = torch.Generator().manual_seed(_TEXT_HASH_SEED)
    weights = torch.randint(1, 2**31 - 1, (input_ids.shape[1],), generator=gen, dtype=torch.int64)
    return (input_ids.long() * weights.to(input_ids.device)[None, :]).sum(dim=1)


def pair_image_codes(image_ids: Sequence[str], b: int, device: torch.device) -> torch.Tensor:
    """`b` int64 image-id codes of the local pairs; without ids, distinct negative codes per global row (no
    collision with the 64-bit hashes in practice), so every rank takes the same collective path either way."""
    if len(image_ids) == b:
        return image_id_codes(image_ids, device=device)
    return -1 - (torch.arange(b, device=device) + b * rank())


def pair_codes(image_ids: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`b 2` codes of the local pairs: column 0 the image id, column 1 the caption (padding ignored)."""
    image = pair_image_codes(image_ids, input_ids.shape[0], input_ids.device)
    return torch.stack([image, text_codes(attention_mask * input_ids)], dim=1)


def itc_codes(enabled: bool, image_ids: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor
              ) -> torch.Tensor | None:
    """The `codes` argument of the ITC losses: `pair_codes` when `model.contrastive.duplicate_positives`, else None."""
    return pair_codes(image_ids, input_ids, attention_mask) if enabled else None


def unmatched_codes(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`n 2` codes that equal no real pair's: the initial content of a code queue (whose features are random)."""
    lowest = torch.iinfo(torch.int64).min
    return rearrange(torch.arange(2 * n, dtype=torch.long, device=device) + lowest, "(n two) -> n two", two=2)


def duplicate_mask(codes: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """`b 2` row codes vs `k 2` column codes -> `b k` bool: same image id OR identical caption."""
    same = codes[:, None, :] == candidates[None, :, :]  # `b k 2`
    return same.any(dim=-1)
