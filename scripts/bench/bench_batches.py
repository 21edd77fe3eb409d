"""Synthetic in-memory batches shared by the step benchmarks (imported as a sibling module)."""
from __future__ import annotations

import torch

from mmpt.data.batch import Batch


def make_batch(batch: int, image_size: int, seq_len: int, vocab: int) -> Batch:
    """Random images `b 3 h w`; captions [CLS] + random ids, the second half padding; one image id per pair."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=gen)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[:, seq_len // 2 :] = 0
    ids[mask == 0] = 0
    return Batch(images=torch.randn(batch, 3, image_size, image_size, generator=gen), input_ids=ids,
                 attention_mask=mask, image_ids=[str(i) for i in range(batch)])
