"""The typed batch that flows from the data pipeline into every model."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    """One collated micro-batch.

    images: `b c h w` float, normalized; input_ids / attention_mask: `b l` (mask 1 = real token);
    keys: WebDataset sample keys; captions: raw caption strings (retrieval by caption identity); image_ids: identity of the image (json `image_id` if present, else key),
    used to never treat two captions of one image as negatives of each other.
    """

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keys: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples dropped since the worker's last batch, by reason

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Move tensors to `device`; only the floating image tensor is cast to `dtype`."""
        images = self.images.to(device, non_blocking=True)
        if dtype is not None:
            images = images.to(dtype)
        return replace(
            self,
            images=images,
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
        )
