"""Shared fixtures: tiny encoded images and WebDataset shards written on the fly (no data files in the repo)."""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image


def encode_image(
    color: tuple[int, int, int] = (128, 64, 32), size: tuple[int, int] = (24, 16), fmt: str = "JPEG"
) -> bytes:
    """A constant-colour image of `size` (w, h) encoded as `fmt` bytes (WEBP lossless, so colours stay exact)."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """Factory: image_bytes(color=(r, g, b), size=(w, h), fmt="JPEG"|"PNG"|"WEBP") -> encoded bytes."""
    return encode_image


@pytest.fixture
def write_shards(tmp_path: Path) -> Callable[..., list[str]]:
    """Factory: write_shards([[sample, ...], ...], name="shard") -> paths of one tar per inner list.

    Samples are WebDataset dicts (`__key__` plus extension -> bytes/str/dict); files go under tmp_path.
    """

    def write(shards: list[list[dict[str, Any]]], name: str = "shard") -> list[str]:
        paths = []
        for i, samples in enumerate(shards):
            path = tmp_path / f"{name}-{i:05d}.tar"
            with wds.TarWriter(str(path)) as sink:
                for sample in samples:
                    sink.write(sample)
            paths.append(str(path))
        return paths

    return write
