"""Per-sample size limits, checked before anything is decoded.

Why: one hostile or broken sample can cost a worker gigabytes and tens of seconds (a 13,000 x 13,000 PNG is
under PIL's own bomb limit and decodes to 0.5 GB; a 5 MB caption is tokenized in full before truncation).
Both sizes are known before decoding: an image's from its header (PIL's `Image.open` parses only the header;
pixels are read on `load`), a caption's from its raw bytes. Over-limit samples are skipped and counted by
reason (`too_many_pixels`, `caption_too_long`) like every other bad sample (`pipeline.SkipCounter`).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000: far above any training resolution, far below a bomb
DEFAULT_MAX_CAPTION_BYTES = 16_384  # ~100x the longest real alt-texts / COCO captions

Problem = tuple[str, str]  # (reason, detail), as `pipeline._prepare` returns for a skipped sample


@dataclass(frozen=True)
class SampleLimits:
    """`data.max_image_pixels` (width x height from the header) and `data.max_caption_bytes` (UTF-8 bytes)."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1 or self.max_caption_bytes < 1:
            raise ValueError(f"sample limits must be >= 1, got max_image_pixels={self.max_image_pixels}, "
                             f"max_caption_bytes={self.max_caption_bytes}")

    def open_image(self, data: bytes) -> Image.Image | Problem:
        """The image opened (header parsed, pixels not decoded) if it is within the pixel limit, else why it
        must be skipped. The decoders take the opened image (`transforms.decode_image`, `decode_for_crop`), so
        the header is parsed once (~50-80 us for a JPEG, ~3% of decoding a 224 px one).

        PIL itself refuses sizes over twice `Image.MAX_IMAGE_PIXELS` (~179M) at open: the same reason here.
        An unreadable header is `bad_image`, as a decode error is.
        """
        try:
            with warnings.catch_warnings():  # PIL warns above ~89M pixels: the limit below decides instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exn:
            return "too_many_pixels", f"{exn} (data.max_image_pixels={self.max_image_pixels})"
        except Exception as exn:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad headers
            return "bad_image", f"{type(exn).__name__}: {exn}"
        width, height = img.size
        if width * height > self.max_image_pixels:
            img.close()
            return "too_many_pixels", (f"{width}x{height} = {width * height} pixels > data.max_image_pixels="
                                       f"{self.max_image_pixels} (not decoded)")
        return img

    def caption_problem(self, raw: bytes | str) -> Problem | None:
        """None if the caption's UTF-8 size is within the limit (checked on raw bytes, before decoding)."""
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        if size > self.max_caption_bytes:
            return "caption_too_long", f"{size} bytes > data.max_caption_bytes={self.max_caption_bytes}"
        return None
