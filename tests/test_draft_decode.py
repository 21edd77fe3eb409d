"""JPEG draft decoding in the train transform: used only when the crop allows, same crop, near-equal pixels."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmpt.data.transforms import TrainTransform, decode_for_crop, decode_image, draft_scale


def _encoded(size: int, fmt: str = "JPEG") -> bytes:
    """Smooth gradients plus a hard-edged disc: both the easy and the hard case for a reduced decode."""
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    ImageDraw.Draw(img).ellipse((size // 6, size // 5, size * 3 // 4, size * 4 // 5), fill=(200, 30, 60))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_draft_scale_keeps_the_crop_at_least_the_output_size():
    assert draft_scale((0, 0, 224, 224), 224) == 1
    assert draft_scale((0, 0, 447, 500), 224) == 1  # 447 / 2 < 224
    assert draft_scale((10, 0, 458, 300), 112) == 2  # min side 300: /2 = 150 >= 112, /4 = 75 < 112
    assert draft_scale((0, 0, 512, 600), 64) == 8


def test_reduced_decode_maps_the_box_onto_the_smaller_image():
    img, box = decode_for_crop(_encoded(256), lambda w, h: (32, 64, 160, 192), 32)  # crop 128 px -> k = 4
    assert img.size == (64, 64) and img.mode == "RGB"
    assert box == pytest.approx((8, 16, 40, 48))
    full, same = decode_for_crop(_encoded(256), lambda w, h: (0, 0, 100, 100), 64)  # 100 / 2 < 64: no draft
    assert full.size == (256, 256) and same == (0, 0, 100, 100)


@pytest.mark.parametrize("out_size", [32, 64])
def test_draft_crops_match_full_decode_crops(out_size):
    data = _encoded(256)
    draft, full = TrainTransform(out_size), TrainTransform(out_size, draft=False)
    for seed in range(6):
        rng_a, rng_b = random.Random(seed), random.Random(seed)
        a, b = draft.from_bytes(data, rng_a), full(decode_image(data), rng_b)
        assert a.shape == b.shape == (3, out_size, out_size)
        assert rng_a.random() == rng_b.random()  # the same draws: the crop box is the full decode's
        pixels = (a - b).abs() * full.normalize.std  # back to [0, 1] units
        assert pixels.mean() < 0.005 and pixels.max() < 0.25  # measured: mean ~0.0015 (0.4 grey levels)


def test_no_draft_when_the_crop_is_small_or_the_image_is_not_jpeg():
    for data, size in ((_encoded(256), 224), (_encoded(256, "PNG"), 32)):
        for seed in range(3):
            a = TrainTransform(size, hflip=True).from_bytes(data, random.Random(seed))
            b = TrainTransform(size, hflip=True)(decode_image(data), random.Random(seed))
            assert torch.equal(a, b)
