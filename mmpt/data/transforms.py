"""Image decoding and train/eval transforms with PIL + torch only (torchvision is not a dependency).

Randomness comes from an explicit `random.Random` passed per sample, never from global state, so a
pipeline seeded once is reproducible no matter how many workers or processes run it.
"""
from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[float, float, float, float]  # PIL (left, upper, right, lower)


def decode_image(data: bytes | Image.Image) -> Image.Image:
    """jpg/png/webp bytes (or an image opened from them, header read, pixels not: `limits.open_image`)
    -> fully loaded RGB image; raises on corrupt or truncated data."""
    return _finish_decode(_opened(data))


def _opened(data: bytes | Image.Image) -> Image.Image:
    return data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))


def _finish_decode(img: Image.Image) -> Image.Image:
    img.load()  # force the decode here so corrupt bytes fail now, not in a later transform
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's recommended path for palette transparency
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() to the same mode copies


DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes directly (DCT scaling), largest first


def draft_scale(box: Box, out_size: int) -> int:
    """The largest JPEG reduction k that still leaves the crop >= out_size pixels on both sides, else 1.

    The resample after it is then still a downscale (never an upscale of lost detail), so the output differs
    from a full decode only by the anti-aliasing filter: libjpeg's DCT scaling vs bicubic."""
    side = min(box[2] - box[0], box[3] - box[1])
    return next((k for k in DRAFT_SCALES if side / k >= out_size), 1)


def decode_for_crop(data: bytes | Image.Image, box_of: Callable[[int, int], Box],
                    out_size: int) -> tuple[Image.Image, Box]:
    """Decode `data` for one crop resized to `out_size`: the crop box comes from the header's size
    (`box_of(width, height)`, so it equals the full decode's), then a JPEG is decoded at 1/k scale when the crop
    allows (`draft_scale`: less IDCT work and memory) and the box is mapped onto the reduced image. `data` may
    be an image opened but not yet loaded (the header check in `mmpt.data.limits` opens it once)."""
    img = _opened(data)
    width, height = img.size
    box = box_of(width, height)
    k = draft_scale(box, out_size)
    if k > 1 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(width / k), math.ceil(height / k)))
        sx, sy = img.width / width, img.height / height  # libjpeg rounds reduced sizes up
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return _finish_decode(img), box


class Normalize:
    """RGB image -> `c h w` float32 (pixel / 255 - mean) / std per channel."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got mean={mean} std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # uint8 v -> (v / 255 - mean) / std = v * scale + shift
        self.scale = 1.0 / (255.0 * self.std)
        self.shift = -self.mean / self.std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised `c h w` float32.

        One float tensor is written and scaled in place: converting to [0, 1] first and then computing
        (x - mean) / std allocates three, and their page faults made that 2.8x slower at 224 px.
        """
        array = np.array(img, dtype=np.uint8)  # h w c, a writable copy (torch refuses to wrap a read-only buffer)
        out = torch.empty(3, *array.shape[:2])
        out.copy_(torch.from_numpy(array).permute(2, 0, 1))  # h w c -> c h w, uint8 -> float32 in one pass
        return out.mul_(self.scale).add_(self.shift)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> Box:
    """A crop covering `scale` of the area with aspect (w/h) in `ratio`, log-uniform (Inception-style).

    Falls back to the largest centred crop with the aspect clamped to `ratio` after 10 misses
    (very elongated images), so it never fails.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


class TrainTransform:
    """Random resized crop -> optional h-flip -> tensor -> normalize; output `c s s`, s = image_size.

    Flip is off by default: captions often say "left"/"right", and flipping makes them wrong. `from_bytes`
    (what the loaders call) decodes a JPEG at 1/2, 1/4 or 1/8 scale when its crop is at least that many times
    the output side (`draft`, on by default: ~1.3x samples/s at 64 px from 224-px JPEGs, scripts/bench/bench_data.py).
    """

    def __init__(
        self,
        image_size: int,
        *,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = False,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        draft: bool = True,
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.image_size = image_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.draft = draft
        self.normalize = Normalize(mean, std)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return self._crop(img, random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng), rng)

    def from_bytes(self, data: bytes | Image.Image, rng: random.Random) -> torch.Tensor:
        """Same crop and rng draws as `__call__(decode_image(data), rng)`; with `draft`, JPEGs whose crop is at
        least twice the output side are decoded at reduced scale (`decode_for_crop`)."""
        if not self.draft:
            return self(decode_image(data), rng)
        img, box = decode_for_crop(
            data, lambda w, h: random_resized_crop_box(w, h, self.scale, self.ratio, rng), self.image_size)
        return self._crop(img, box, rng)

    def _crop(self, img: Image.Image, box: Box, rng: random.Random) -> torch.Tensor:
        # resize(box=...) crops and resamples in one pass, cheaper than crop() then resize()
        out = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.normalize(out)


class EvalTransform:
    """Resize shorter side to image_size -> centre crop -> tensor -> normalize; deterministic, `c s s`."""

    def __init__(self, image_size: int, *, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.image_size = image_size
        self.normalize = Normalize(mean, std)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        # the centred square of side min(w, h), scaled to image_size, is exactly resize-shorter-side
        # followed by centre crop, done as a single resample
        side = min(img.width, img.height)
        left, top = (img.width - side) / 2, (img.height - side) / 2
        box = (left, top, left + side, top + side)
        out = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        return self.normalize(out)
