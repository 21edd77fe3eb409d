"""Shared fixtures: tiny encoded images and WebDataset shards written on the fly (no data files in the repo)."""
from __future__ import annotations

import io
import json
import os
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


# ---- the demo dataset (synthetic shards + tokenizer) in the layout mmpt/conf/data/demo.yaml expects ----------

DEMO_TRAIN_SHARDS = 20  # mmpt/conf/data/demo.yaml: train/{00000..00019}.tar, eval/{00000..00003}.tar
DEMO_EVAL_SHARDS = 4


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo set: 20 train shards x 16, 4 eval shards x 16 (another seed), tokenizer.json."""
    from mmpt.data.synthetic import write_shards as write_synthetic
    from mmpt.data.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("demo")
    write_synthetic(root / "train", num_samples=16 * DEMO_TRAIN_SHARDS, shard_size=16, seed=0, image_size=32)
    write_synthetic(root / "eval", num_samples=16 * DEMO_EVAL_SHARDS, shard_size=16, seed=1, image_size=32)
    captions = [json.loads(s["json"])["caption"] for p in sorted((root / "train").glob("*.tar"))
                for s in wds.WebDataset(str(p), shardshuffle=False)]
    train_wordpiece(captions, vocab_size=200).save(str(root / "tokenizer.json"))
    return root


@pytest.fixture
def demo_env(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for CLI subprocesses and in-process composition: demo data, offline W&B, 1 thread."""
    env = {"MMPT_DEMO_DIR": str(demo_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DISABLE_GIT": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


# Tests compose mmpt/conf/ through Hydra's API: the model presets that mmpt/conf/model/*/*.yaml name must be registered.
from mmpt.models.registry import register_model_presets  # noqa: E402

register_model_presets()


@pytest.fixture(autouse=True)
def _drop_log_handlers_on_closed_streams():
    """In-process CLI runs (Hydra's job logging) attach handlers to the stream pytest captured for THAT test;
    once it closes, a later test's log call would print 'Logging error' into its own stderr."""
    yield
    import logging

    for logger in (logging.getLogger(), logging.getLogger("mmpt"), logging.getLogger("hydra")):
        for handler in list(logger.handlers):
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                logger.removeHandler(handler)
