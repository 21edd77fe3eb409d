"""The retrieval galleries of the Karpathy/COCO protocol, and ranks computed a block of queries at a time.

An eval set holds texts (captions) and images, several captions per image. text->image ranks the UNIQUE
images; image->text ranks all texts. Which candidate counts as correct is a label test: every text has one
label, every image the set of labels of its texts; a candidate is correct when the text's label is among the
image's labels. Label = the image itself gives the standard protocol; label = the caption string gives the
"caption identity" variant (the synthetic set repeats captions, so an image described by the same words is an
equally right answer).

Why blocks: at COCO scale (25,000 texts x 5,000 images) a full score matrix is 500 MB per direction and an
argsort of it 1 GB more, on every rank; a block of queries needs a few MB and gives the same ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BLOCK_ELEMENTS = 1 << 20  # scores per query block (4 MB of float32; ~8 such temporaries at a time)


@dataclass
class EvalInputs:
    """What ITM re-ranking and captioning need beyond the embeddings.

    input_ids / attention_mask `n l`: every text, in key order (gathered on every rank: small).
    pixels `m c h w`: only the images THIS rank scores (never every rank's pixels), named by pixel_image_ids;
    None there means the rows align with the texts of the embeddings (one process that holds everything).
    """

    pixels: torch.Tensor  # m c h w
    input_ids: torch.Tensor  # n l
    attention_mask: torch.Tensor  # n l
    pixel_image_ids: list[str] | None = None

    def pixel_rows(self, text_image_ids: list[str]) -> dict[str, int]:
        """image id -> its row in `pixels`, for the images this rank holds (text_image_ids: the texts' image
        ids, used when pixel_image_ids is None)."""
        rows: dict[str, int] = {}
        for row, image_id in enumerate(self.pixel_image_ids if self.pixel_image_ids is not None else text_image_ids):
            rows.setdefault(image_id, row)
        return rows


@dataclass
class EvalEmbeddings:
    """One row per text, in key order, identical on every rank; `images[i]` embeds text i's image."""

    images: torch.Tensor  # n e, L2-normalized
    texts: torch.Tensor  # n e, L2-normalized
    captions: list[str]
    image_ids: list[str]
    keys: list[str]
    inputs: EvalInputs | None = None  # kept for ITM re-ranking / captioning


def label_codes(labels: list[str]) -> torch.Tensor:
    """Strings -> int64 codes, equal strings equal codes, numbered in order of first appearance."""
    lookup: dict[str, int] = {}
    return torch.tensor([lookup.setdefault(x, len(lookup)) for x in labels], dtype=torch.long)


@dataclass
class Gallery:
    """The unique images of an eval set, in order of first appearance among the (key-ordered) texts."""

    image_ids: list[str]
    first_text: torch.Tensor  # n_img: the first text of each image (its image embedding stands for the image)
    text_image: torch.Tensor  # n_txt: gallery index of each text's image

    @classmethod
    def of(cls, image_ids: list[str]) -> "Gallery":
        text_image = label_codes(image_ids)
        n_img = int(text_image.max()) + 1 if len(image_ids) else 0
        first = torch.full((n_img,), len(image_ids), dtype=torch.long)
        first.scatter_reduce_(0, text_image, torch.arange(len(image_ids)), reduce="amin")
        return cls([image_ids[i] for i in first.tolist()], first, text_image)

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class Labels:
    """text_label `n_txt`; (pair_image, pair_label): the distinct (image, label) pairs, i.e. each image's labels."""

    text_label: torch.Tensor
    pair_image: torch.Tensor
    pair_label: torch.Tensor
    num_images: int

    @classmethod
    def of(cls, gallery: Gallery, text_label: torch.Tensor) -> "Labels":
        span = int(text_label.max()) + 1 if len(text_label) else 1
        pairs = (gallery.text_image * span + text_label).unique()
        return cls(text_label, pairs // span, pairs % span, len(gallery))

    def t2i_correct(self, queries: torch.Tensor) -> torch.Tensor:
        """`q n_img` bool: image i is correct for text q when q's label is one of i's labels."""
        wanted, row_of = self.text_label[queries].unique(return_inverse=True)
        keep = torch.isin(self.pair_label, wanted)
        table = torch.zeros(len(wanted), self.num_images, dtype=torch.bool)
        table[torch.searchsorted(wanted, self.pair_label[keep]), self.pair_image[keep]] = True
        return table[row_of]

    def i2t_correct(self, start: int, end: int) -> torch.Tensor:
        """`(end - start) n_txt` bool for the images start..end-1: text t is correct when its label is theirs."""
        keep = (self.pair_image >= start) & (self.pair_image < end)
        span = int(self.text_label.max()) + 1 if len(self.text_label) else 1
        table = torch.zeros(end - start, span, dtype=torch.bool)
        table[self.pair_image[keep] - start, self.pair_label[keep]] = True
        return table[:, self.text_label]


def first_hit_ranks(sims: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """sims, correct `q c` -> `q`: the 0-based position of the first correct candidate when each row is sorted
    by descending score, ties in candidate order (a stable sort: deterministic); c when none is correct.
    Counted, not sorted: candidates above the best correct score, plus equal ones listed before it."""
    c = sims.shape[1]
    best = torch.where(correct, sims, torch.tensor(float("-inf"))).amax(dim=1, keepdim=True)  # q 1
    at_best = sims == best  # q c
    first_best = (correct & at_best).to(torch.uint8).argmax(dim=1, keepdim=True)  # q 1: argmax takes the first
    ahead = (sims > best) | (at_best & (torch.arange(c) < first_best))
    return torch.where(correct.any(dim=1), ahead.sum(dim=1), c)


def query_blocks(num_queries: int, num_candidates: int) -> Iterator[tuple[int, int]]:
    """(start, end) blocks of queries whose score block stays near BLOCK_ELEMENTS."""
    step = max(1, BLOCK_ELEMENTS // max(1, num_candidates))
    for start in range(0, num_queries, step):
        yield start, min(start + step, num_queries)


ScoreRows = Callable[[str, int, int], torch.Tensor]  # (direction, start, end) -> `(end - start) candidates`


def itc_rows(emb: EvalEmbeddings, gallery: Gallery) -> ScoreRows:
    """Cosine score rows: t2i `texts[start:end] x images`, i2t `images[start:end] x texts`."""
    images = emb.images[gallery.first_text]

    def rows(direction: str, start: int, end: int) -> torch.Tensor:
        if direction == "t2i":
            return emb.texts[start:end] @ images.T
        return images[start:end] @ emb.texts.T

    return rows


@dataclass
class Reranked:
    """Re-scored candidates per direction: top `q k` (candidate indices) and placed `q k` scores, which sit
    above every cosine (the rest of each row keeps its ITC cosine)."""

    top: dict[str, torch.Tensor]
    placed: dict[str, torch.Tensor]

    def over(self, base: ScoreRows) -> ScoreRows:
        def rows(direction: str, start: int, end: int) -> torch.Tensor:
            out = base(direction, start, end).clone()
            return out.scatter_(1, self.top[direction][start:end], self.placed[direction][start:end])

        return rows
