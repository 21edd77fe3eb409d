"""The typed batches that flow from the data pipeline into every model.

`Batch` holds one kind of sample: image-text pairs (what CLIP/ALBEF/CoCa train on), images only or texts
only (BEiT-3/VLMo stagewise and masked data modeling). `MixedBatch` holds one `Batch` per kind, with a fixed
number of samples per kind on every rank and step, so collectives inside models see equal shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

KINDS = ("pairs", "images", "texts")


@dataclass
class Batch:
    """One collated micro-batch of a single kind.

    images: `b c h w` float, normalized (None for text-only); input_ids / attention_mask: `b l` (mask 1 = real
    token; None for image-only); image_mask: `b n` bool over the `n` image patches, True = masked (block-wise,
    made in the data workers when `data.image_mask.enabled`); keys: WebDataset sample keys; captions: raw
    caption strings (retrieval by caption identity); image_ids: identity of the image (json `image_id` if
    present, else key), used to never treat two captions of one image as negatives of each other.
    """

    images: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples dropped since the worker's last batch, by reason
    image_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # shape checks only (metadata, no host sync): a malformed batch fails here, not deep inside a model
        if self.images is None and self.input_ids is None:
            raise ValueError("Batch needs images, input_ids or both; got neither")
        if (self.input_ids is None) != (self.attention_mask is None):
            raise ValueError("Batch.input_ids and Batch.attention_mask must be given together (both `b l`)")
        if self.image_mask is not None and self.images is None:
            raise ValueError("Batch.image_mask (`b n`) needs images; text-only batches have no patches to mask")
        sizes = {name: int(t.shape[0]) for name, t in (("images", self.images), ("input_ids", self.input_ids),
                 ("attention_mask", self.attention_mask), ("image_mask", self.image_mask)) if t is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch tensors disagree on the batch size: {sizes}")

    @property
    def kind(self) -> str:
        """"pairs" (images and text), "images" (no text) or "texts" (no images)."""
        if self.images is None:
            return "texts"
        return "images" if self.input_ids is None else "pairs"

    def __len__(self) -> int:
        lead = self.images if self.images is not None else self.input_ids
        assert lead is not None  # __post_init__
        return int(lead.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Move tensors to `device`; only the floating image tensor is cast to `dtype`."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        images = move(self.images)
        if images is not None and dtype is not None:
            images = images.to(dtype)
        return replace(self, images=images, input_ids=move(self.input_ids),
                       attention_mask=move(self.attention_mask), image_mask=move(self.image_mask))


@dataclass
class MixedBatch:
    """One micro-batch from several data sources: one `Batch` per kind, keyed by its kind."""

    parts: dict[str, Batch]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("MixedBatch needs at least one part")
        wrong = {key: part.kind for key, part in self.parts.items() if key != part.kind}
        if wrong:
            raise ValueError(f"MixedBatch parts must be keyed by their kind ({', '.join(KINDS)}); "
                             f"got {wrong} (key: kind)")

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples dropped by reason, summed over the parts."""
        out: dict[str, int] = {}
        for part in self.parts.values():
            for reason, count in part.skipped.items():
                out[reason] = out.get(reason, 0) + count
        return out

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MixedBatch":
        return MixedBatch({kind: part.to(device, dtype) for kind, part in self.parts.items()})
