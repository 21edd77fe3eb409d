"""BEiT v2 block-wise image masking (BEiT-3 masked data modeling), made per sample in the data workers.

Why blocks: with single random patches a model in-paints from the immediate neighbours; masking
whole rectangles of patches forces it to reason about larger regions. Why in the workers: the mask is a
per-sample random draw with a Python loop, cheap next to JPEG decoding and off the GPU's critical path.

Algorithm (BEiT v2 `MaskingGenerator`): repeat { area ~ U(min_patches, remaining), aspect h/w log-uniform
in [min_aspect, max_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), random
top/left; accept the rectangle if it adds between 1 and `remaining` new patches } until the target is met
or MAX_ATTEMPTS rectangles in a row are refused; then top up with random single patches so the count is
exact. A block never adds more than `remaining`, so the count can only fall short, never overshoot.
Unlike BEiT v2, a rounded rectangle that breaks the size or aspect limits is refused instead of used,
so every block really has >= min_patches patches and an aspect inside the limits.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

MAX_ATTEMPTS = 10  # rectangles tried for one block before topping up at random (BEiT v2's value)


@dataclass(frozen=True)
class Block:
    """A rectangle of patches on the `grid_h x grid_w` grid (rows top..top+height-1)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def area(self) -> int:
        return self.height * self.width


def num_masked_for(num_patches: int, ratio: float) -> int:
    """Masked patches for a ratio, rounded half up: 0.4 of 196 -> 78 (BEiT v2's preset is 75 of 196: pass
    that as an explicit count)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(math.floor(ratio * num_patches + 0.5))


def _aspect_limits(min_aspect: float, max_aspect: float | None) -> float:
    """The upper aspect limit (default 1 / min_aspect), after checking 0 < min_aspect <= max_aspect."""
    if not min_aspect > 0.0 or (max_aspect is not None and not min_aspect <= max_aspect):
        raise ValueError(f"need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect} max_aspect={max_aspect}")
    return 1.0 / min_aspect if max_aspect is None else max_aspect


def _check(grid_h: int, grid_w: int, num_masked: int, min_patches: int, min_aspect: float,
           max_aspect: float | None) -> float:
    """Validate the arguments; returns the upper aspect limit."""
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"mask grid must be at least 1x1 patches, got {grid_h}x{grid_w}")
    if not 0 <= num_masked <= grid_h * grid_w:
        raise ValueError(f"num_masked={num_masked} must be in [0, {grid_h * grid_w}] for a {grid_h}x{grid_w} grid")
    if min_patches < 1:
        raise ValueError(f"min_patches={min_patches} must be >= 1")
    return _aspect_limits(min_aspect, max_aspect)


def sample_block(grid_h: int, grid_w: int, max_area: int, rng: random.Random, min_patches: int = 16,
                 min_aspect: float = 0.3, max_aspect: float | None = None) -> Block | None:
    """One candidate rectangle, or None when its rounded size breaks the grid, size or aspect limits.

    area ~ U(min_patches, max(min_patches, max_area)); aspect (height/width) log-uniform in
    [min_aspect, max_aspect] (default max_aspect = 1 / min_aspect).
    """
    max_aspect = _aspect_limits(min_aspect, max_aspect)
    area = rng.uniform(min_patches, max(min_patches, max_area))
    aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(max_aspect)))
    height = int(round(math.sqrt(area * aspect)))
    width = int(round(math.sqrt(area / aspect)))
    if not (1 <= height <= grid_h and 1 <= width <= grid_w):
        return None
    if height * width < min_patches or not min_aspect <= height / width <= max_aspect:
        return None
    return Block(rng.randint(0, grid_h - height), rng.randint(0, grid_w - width), height, width)


def block_mask(grid_h: int, grid_w: int, num_masked: int, rng: random.Random, min_patches: int = 16,
               min_aspect: float = 0.3, max_aspect: float | None = None) -> np.ndarray:
    """`(grid_h * grid_w,)` bool, row-major, True = masked, with exactly `num_masked` True entries."""
    max_aspect = _check(grid_h, grid_w, num_masked, min_patches, min_aspect, max_aspect)
    mask = np.zeros((grid_h, grid_w), dtype=bool)
    count = 0
    while count < num_masked:
        added = 0
        for _ in range(MAX_ATTEMPTS):
            block = sample_block(grid_h, grid_w, num_masked - count, rng, min_patches, min_aspect, max_aspect)
            if block is None:
                continue
            window = mask[block.top:block.top + block.height, block.left:block.left + block.width]
            new = block.area - int(window.sum())
            if 0 < new <= num_masked - count:
                window[...] = True  # a view: writes into `mask`
                added = new
                break
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    if count < num_masked:  # blocks stopped fitting: top up with random single patches
        free = np.flatnonzero(~flat).tolist()
        flat[rng.sample(free, num_masked - count)] = True
    return flat


class BlockMasker:
    """Fixed grid and count, checked once; `masker(rng)` -> one `(n,)` bool mask (n = grid_h * grid_w)."""

    def __init__(self, grid_h: int, grid_w: int, num_masked: int, min_patches: int = 16, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        self.max_aspect = _check(grid_h, grid_w, num_masked, min_patches, min_aspect, max_aspect)
        self.grid_h, self.grid_w, self.num_masked = grid_h, grid_w, num_masked
        self.min_patches, self.min_aspect = min_patches, min_aspect

    @classmethod
    def for_image(cls, image_size: int, patch_size: int, ratio: float = 0.4, num_masked: int | None = None,
                  min_patches: int = 16, min_aspect: float = 0.3, max_aspect: float | None = None) -> "BlockMasker":
        """Square images of `image_size` px cut into `patch_size` patches; `num_masked` overrides `ratio`."""
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        side = image_size // patch_size
        count = num_masked_for(side * side, ratio) if num_masked is None else num_masked
        return cls(side, side, count, min_patches, min_aspect, max_aspect)

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    def __call__(self, rng: random.Random) -> np.ndarray:
        return block_mask(self.grid_h, self.grid_w, self.num_masked, rng, self.min_patches, self.min_aspect,
                          self.max_aspect)
