"""BEiT v2 block-wise masking: exact counts, block shape limits, blockiness, ratio rounding, errors."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mmpt.data.masking import Block, BlockMasker, block_mask, num_masked_for, sample_block


class ScriptedRng:
    """Stands in for random.Random with scripted draws, so a block can be computed by hand."""

    def __init__(self, uniforms: list[float], randints: list[int]):
        self.uniforms, self.randints = list(uniforms), list(randints)

    def uniform(self, lo: float, hi: float) -> float:
        value = self.uniforms.pop(0)
        assert min(lo, hi) <= value <= max(lo, hi), (lo, hi, value)
        return value

    def randint(self, lo: int, hi: int) -> int:
        value = self.randints.pop(0)
        assert lo <= value <= hi, (lo, hi, value)
        return value


def adjacent_masked_pairs(mask: np.ndarray, h: int, w: int) -> int:
    """Horizontally or vertically adjacent pairs of masked patches."""
    grid = mask.reshape(h, w)
    return int((grid[:, 1:] & grid[:, :-1]).sum() + (grid[1:, :] & grid[:-1, :]).sum())


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (4, 4), (8, 8), (14, 14), (7, 20)])
@pytest.mark.parametrize("min_patches", [4, 16])
def test_exact_count_for_every_seed_and_count(grid, min_patches):
    h, w = grid
    n = h * w
    for num in sorted({0, 1, n // 3, num_masked_for(n, 0.4), n - 1, n}):
        for seed in range(15):
            mask = block_mask(h, w, num, random.Random(seed), min_patches=min_patches)
            assert mask.shape == (n,) and mask.dtype == bool
            assert int(mask.sum()) == num, (grid, num, seed)


def test_block_by_hand():
    # area 16, log-aspect 0 -> aspect 1 -> 4x4 at the scripted top/left
    rng = ScriptedRng([16.0, 0.0], [2, 3])
    assert sample_block(14, 14, 78, rng) == Block(top=2, left=3, height=4, width=4)
    # area 20, aspect 0.45: h = round(sqrt(9)) = 3, w = round(sqrt(44.4)) = 7
    rng = ScriptedRng([20.0, math.log(0.45)], [0, 7])
    assert sample_block(14, 14, 78, rng) == Block(top=0, left=7, height=3, width=7)
    # area 16, aspect 0.3: h = round(2.19) = 2, w = round(7.30) = 7 -> 14 patches < 16: refused
    assert sample_block(14, 14, 78, ScriptedRng([16.0, math.log(0.3)], [])) is None
    # 2 x 20 does not fit an 8-wide grid
    assert sample_block(14, 8, 78, ScriptedRng([40.0, math.log(0.1)], []), min_aspect=0.1) is None


def test_accepted_blocks_respect_size_aspect_and_grid():
    rng = random.Random(0)
    blocks = [sample_block(14, 14, 78, rng, min_patches=16, min_aspect=0.3) for _ in range(2000)]
    accepted = [b for b in blocks if b is not None]
    assert len(accepted) > 1500  # rounding refuses only a few
    for b in accepted:
        assert b.area >= 16
        assert 0.3 <= b.height / b.width <= 1 / 0.3
        assert 0 <= b.top and b.top + b.height <= 14 and 0 <= b.left and b.left + b.width <= 14
    aspects = [b.height / b.width for b in accepted]
    assert min(aspects) < 0.5 and max(aspects) > 2.0  # log-uniform: both wide and tall blocks
    assert max(b.area for b in accepted) > 60  # areas reach up to the remaining budget
    wide_only = [sample_block(14, 14, 78, rng, max_aspect=1.0) for _ in range(300)]
    assert all(b.height <= b.width for b in wide_only if b is not None)


def test_masks_are_blocky_not_random():
    # 75 of 196 masked at random: E[adjacent masked pairs] = 364 * (75/196) * (74/195) = 52.9
    random_pairs = 364 * 75 / 196 * 74 / 195
    block_pairs = np.mean([adjacent_masked_pairs(block_mask(14, 14, 75, random.Random(s)), 14, 14)
                           for s in range(40)])
    assert block_pairs > 1.8 * random_pairs
    # when no block can fit (min_patches > count) the top-up is random: no more adjacency than chance
    fallback = np.mean([adjacent_masked_pairs(block_mask(14, 14, 10, random.Random(s), min_patches=16), 14, 14)
                        for s in range(200)])
    assert fallback < 1.5 * 364 * 10 / 196 * 9 / 195


def test_reproducible_per_seed():
    a = block_mask(14, 14, 75, random.Random(7))
    assert np.array_equal(a, block_mask(14, 14, 75, random.Random(7)))
    assert not np.array_equal(a, block_mask(14, 14, 75, random.Random(8)))


def test_ratio_rounding_and_explicit_count():
    assert num_masked_for(196, 0.4) == 78  # 78.4
    assert num_masked_for(64, 0.4) == 26  # 25.6
    assert num_masked_for(10, 0.25) == 3  # 2.5 rounds half up (Python's round() would give 2)
    masker = BlockMasker.for_image(224, 16, ratio=0.4)
    assert (masker.grid_h, masker.grid_w, masker.num_masked, masker.num_patches) == (14, 14, 78, 196)
    beit_v2 = BlockMasker.for_image(224, 16, num_masked=75)  # BEiT v2's preset count
    assert all(int(beit_v2(random.Random(s)).sum()) == 75 for s in range(10))


@pytest.mark.parametrize("call, message", [
    (lambda: block_mask(4, 4, 17, random.Random(0)), "num_masked=17 must be in [0, 16]"),
    (lambda: block_mask(0, 4, 0, random.Random(0)), "at least 1x1"),
    (lambda: block_mask(4, 4, 3, random.Random(0), min_aspect=0.0), "0 < min_aspect <= max_aspect"),
    (lambda: block_mask(4, 4, 3, random.Random(0), min_aspect=0.5, max_aspect=0.4), "min_aspect <= max_aspect"),
    (lambda: block_mask(4, 4, 3, random.Random(0), min_patches=0), "min_patches=0 must be >= 1"),
    (lambda: BlockMasker.for_image(64, 10), "patch_size=10 must divide image_size=64"),
    (lambda: BlockMasker.for_image(64, 8, ratio=1.5), "ratio must be in [0, 1]"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)
