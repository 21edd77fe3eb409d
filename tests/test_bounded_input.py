"""Bounded bad input: over-size samples skipped before decode and counted, damaged tars counted as `bad_tar`,
a train stream without data stopping with one clear error, eval reporting what it skipped (issue 14 item 4)."""
from __future__ import annotations

import logging
import os
import random
import struct
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import ImageFile

from mmpt.data import pipeline
from mmpt.data.batch import Batch
from mmpt.data.limits import SampleLimits
from mmpt.data.pipeline import build_eval_loader, build_train_loader
from mmpt.data.stall import DataStreamError
from mmpt.data.tokenizer import TextTokenizer, train_wordpiece

WORDS = "a red dog on the left of blue cat sits right green bird".split()
SIZE = 16


def caption(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(3 + i % 5))


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_wordpiece([caption(i) for i in range(40)], vocab_size=100), max_len=12)


def good(i: int, image_bytes, size: tuple[int, int] = (24, 18)) -> dict:
    return {"__key__": f"s{i:04d}", "jpg": image_bytes((30 * (i % 8), 90, 7 * i % 256), size), "txt": caption(i)}


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width x height RGB, followed by a few bytes of pixel data: opening it reads the
    header only; decoding it would allocate width x height x 3 bytes and then fail on the missing data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def eval_pass(urls, tokenizer, **kwargs) -> tuple[list[Batch], pipeline.BatchLoader]:
    loader = build_eval_loader(urls, tokenizer, batch_size=4, image_size=SIZE, num_workers=kwargs.pop("num_workers", 0),
                               rank=0, world_size=1, **kwargs)
    return list(loader), loader


def keys_of(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k in b.keys]


# ---- size limits, before decode ------------------------------------------------------------------------------

def test_huge_image_header_is_skipped_without_decoding(write_shards, image_bytes, tokenizer, monkeypatch):
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(img):  # every decode goes through ImageFile.load (called again by convert and resize)
        decoded.append(img.size)
        return real_load(img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    bomb = {"__key__": "bomb", "png": png_header_claiming(13000, 13000), "txt": "a red dog"}
    (url,) = write_shards([[good(0, image_bytes), bomb, good(1, image_bytes)]])
    batches, loader = eval_pass(url, tokenizer)
    assert keys_of(batches) == ["s0000", "s0001"]
    assert loader.skipped_total == {"too_many_pixels": 1}  # not bad_image: the bogus pixel data was never read
    assert (13000, 13000) not in decoded and (24, 18) in decoded


def test_pixel_limit_is_exact_on_header_size(write_shards, image_bytes, tokenizer):
    samples = [good(0, image_bytes, (24, 18)), good(1, image_bytes, (25, 18)), good(2, image_bytes, (18, 24))]
    (url,) = write_shards([samples])
    batches, loader = eval_pass(url, tokenizer, limits=SampleLimits(max_image_pixels=24 * 18))
    assert keys_of(batches) == ["s0000", "s0002"] and loader.skipped_total == {"too_many_pixels": 1}
    # a train stream counts it per batch too
    train = build_train_loader(url, tokenizer, batch_size=2, image_size=SIZE, num_workers=0, seed=0, rank=0,
                               world_size=1, shuffle_buffer=0, limits=SampleLimits(max_image_pixels=24 * 18))
    batch = next(iter(train))
    assert set(batch.keys) == {"s0000", "s0002"} and batch.skipped == {"too_many_pixels": 1}


def test_long_captions_are_skipped_on_raw_bytes(write_shards, image_bytes, tokenizer):
    limit = 64
    at_limit = "é" * (limit // 2)  # 64 UTF-8 bytes, 32 characters: the limit counts bytes
    samples = [
        {**good(0, image_bytes), "txt": at_limit},
        {**good(1, image_bytes), "txt": at_limit + "a"},
        {**good(2, image_bytes), "txt": "a dog " * (5 * 2**20 // 6)},  # 5 MB
        {**good(3, image_bytes), "json": {"captions": ["a cat", "b" * (limit + 1)]}},  # eval layout: any caption
        good(4, image_bytes),
    ]
    (url,) = write_shards([samples])
    batches, loader = eval_pass(url, tokenizer, limits=SampleLimits(max_caption_bytes=limit))
    assert keys_of(batches) == ["s0000", "s0004"]
    assert loader.skipped_total == {"caption_too_long": 3}
    started = time.perf_counter()  # default limit (16 KB): the 5 MB caption is skipped before it is decoded
    batches, loader = eval_pass(url, tokenizer)
    assert keys_of(batches) == ["s0000", "s0001", "s0003", "s0003/1", "s0004"]
    assert loader.skipped_total == {"caption_too_long": 1} and time.perf_counter() - started < 5


def test_a_text_file_line_without_end_is_read_bounded_and_skipped(tmp_path):
    from mmpt.data.pipeline import SampleSource, SkipCounter, _read_lines

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"a red dog\n" + b"x" * (3 * 2**20) + b"\nsits on the left\n" + b"y" * 101)
    source = SampleSource([str(path)], kind="texts", limits=SampleLimits(max_caption_bytes=100))
    counter = SkipCounter(0, 0)
    texts = [s.caption for s in source.pass_samples(counter, 0, 1, 0, 1)]
    assert texts == ["a red dog", "sits on the left"] and counter.total == {"caption_too_long": 2}

    class Chunks:  # what _read_lines holds is bounded: no line it yields exceeds limit + 1 bytes
        def __init__(self) -> None:
            self.left = 64

        def read(self, size: int) -> bytes:
            self.left -= 1
            return b"z" * size if self.left > 0 else b""

    assert [len(line) for line in _read_lines(Chunks(), max_len=100, chunk_size=1 << 16)] == [101]


# ---- damaged tars ---------------------------------------------------------------------------------------------

def members_of(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return archive.getmembers()


@pytest.mark.parametrize("damage", ["cut_in_data", "cut_at_member", "cut_in_header", "garbage_header"])
def test_damaged_tar_counted_as_bad_tar_with_its_name(write_shards, image_bytes, tokenizer, caplog, damage):
    urls = write_shards([[good(i, image_bytes) for i in range(4)], [good(i, image_bytes) for i in range(4, 10)]])
    data = bytearray(Path(urls[1]).read_bytes())
    members = members_of(urls[1])  # jpg, txt per sample: members[4] is s0006's jpg, members[6] s0007's
    cut = members[6].offset
    if damage == "garbage_header":  # the rest of the file is intact: tarfile used to stop here without a word
        data[cut:cut + 512] = b"x" * 512
    else:
        in_data = members[4].offset_data + members[4].size // 2
        data = data[:{"cut_in_data": in_data, "cut_at_member": cut, "cut_in_header": cut + 100}[damage]]
    Path(urls[1]).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mmpt.data.pipeline"):
        batches, loader = eval_pass(urls, tokenizer)
    keys = keys_of(batches)
    intact = ["s0004", "s0005"] + (["s0006"] if damage != "cut_in_data" else [])
    assert keys == ["s0000", "s0001", "s0002", "s0003", *intact]
    assert loader.skipped_total == {"bad_tar": 1}  # a cut inside s0006's jpg: no partial sample is made
    warned = [r.getMessage() for r in caplog.records if "bad tar shard" in r.getMessage()]
    assert len(warned) == 1 and os.path.basename(urls[1]) in warned[0]


def test_intact_tars_and_pipes_give_no_bad_tar(write_shards, image_bytes, tokenizer):
    urls = write_shards([[good(i, image_bytes) for i in range(3)], [good(i, image_bytes) for i in range(3, 5)]])
    batches, loader = eval_pass([urls[0], f"pipe:cat {urls[1]}"], tokenizer)
    assert keys_of(batches) == [f"s{i:04d}" for i in range(5)] and loader.skipped_total == {}
    # a train stream stops reading a shard in the middle (batch full): not damage either
    train = build_train_loader(urls, tokenizer, batch_size=2, image_size=SIZE, num_workers=0, seed=0, rank=0,
                               world_size=1, shuffle_buffer=0)
    stream = iter(train)
    for _ in range(5):
        next(stream)
    assert train.skipped_total == {}


# ---- a train stream without data stops -----------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_all_shards_deleted_mid_run_stops_with_one_line(write_shards, image_bytes, tokenizer, workers):
    urls = write_shards([[good(10 * s + i, image_bytes) for i in range(3)] for s in range(4)])
    max_empty_s = 10.0
    loader = build_train_loader(urls, tokenizer, batch_size=2, image_size=SIZE, num_workers=workers, seed=0, rank=0,
                                world_size=1, shuffle_buffer=2, max_empty_s=max_empty_s)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    for url in urls:
        os.remove(url)
    started = time.perf_counter()
    with pytest.raises(DataStreamError) as err:
        for _ in range(100):  # what was read ahead is used up first
            next(stream)
    assert time.perf_counter() - started < max_empty_s
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("data rank 0 worker 0: all 4 shard(s) gave no samples in a row")


def test_no_usable_sample_for_max_empty_s_stops(write_shards, image_bytes, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_SKIPS_IN_A_ROW", 10**9)  # only the clock may stop it
    (url,) = write_shards([[{**good(i, image_bytes), "txt": "x" * 100} for i in range(4)]])
    loader = build_train_loader(url, tokenizer, batch_size=2, image_size=SIZE, num_workers=0, seed=0, rank=0,
                                world_size=1, shuffle_buffer=0, limits=SampleLimits(max_caption_bytes=50),
                                max_empty_s=0.3)
    started = time.perf_counter()
    with pytest.raises(DataStreamError, match=r"no usable sample for \d+ s \(data.max_empty_s=0.3\)"):
        next(iter(loader))
    assert 0.3 <= time.perf_counter() - started < 5


def test_time_spent_outside_the_stream_is_not_counted(write_shards, image_bytes, tokenizer):
    # every other sample is skipped; the trainer holds the stream for longer than max_empty_s between batches
    samples = [good(i, image_bytes) if i % 2 else {**good(i, image_bytes), "txt": "x" * 100} for i in range(8)]
    (url,) = write_shards([samples])
    loader = build_train_loader(url, tokenizer, batch_size=2, image_size=SIZE, num_workers=0, seed=0, rank=0,
                                world_size=1, shuffle_buffer=0, limits=SampleLimits(max_caption_bytes=50),
                                max_empty_s=0.4)
    stream = iter(loader)
    skipped: Counter = Counter()
    for i in range(3):
        if i:
            time.sleep(0.5)  # the trainer's step, an evaluation, ...: longer than max_empty_s
        skipped.update(next(stream).skipped)
    assert skipped["caption_too_long"] >= 4


@pytest.mark.slow  # a worker blocked in a read for 1.5 s, then the DataLoader's shutdown
def test_a_worker_stuck_in_a_read_stops_the_main_process(write_shards, image_bytes, tokenizer):
    (path,) = write_shards([[good(i, image_bytes) for i in range(4)]])
    loader = build_train_loader(f"pipe:sleep 1.5; cat {path}", tokenizer, batch_size=2, image_size=SIZE,
                                num_workers=1, seed=0, rank=0, world_size=1, shuffle_buffer=0, max_empty_s=0.5)
    started = time.perf_counter()
    with pytest.raises(DataStreamError, match=r"^data rank 0: no batch from the data-loader workers for 0.5 s"):
        next(iter(loader))
    # the workers are stopped before the error is raised (so none outlives it): a join of up to 5 s
    assert time.perf_counter() - started < 0.5 + 5 + 1


# ---- evaluation reports its skips ----------------------------------------------------------------------------

def test_eval_reports_skipped_samples_by_reason(write_shards, image_bytes, tokenizer):
    from mmpt.engine.config import EvalConfig
    from mmpt.eval.runner import evaluate_model
    from mmpt.models.registry import build_model, preset_config

    shards = [
        [good(0, image_bytes), {**good(1, image_bytes), "txt": "x" * 100}, good(2, image_bytes)],
        # every sample of this shard is skipped: its worker yields no batch, its skips still count
        [{"__key__": "bomb", "png": png_header_claiming(13000, 13000), "txt": "a dog"},
         {**good(3, image_bytes), "jpg": b"\xff\xd8\xff not a jpeg"}],
    ]
    urls = write_shards(shards)
    torch.manual_seed(0)
    model = build_model(preset_config("clip", "tiny", vision={"image_size": SIZE, "patch_size": 8},
                                      text={"vocab_size": 100, "max_text_len": 12}))
    loader = build_eval_loader(urls, tokenizer, batch_size=4, image_size=SIZE, num_workers=2, rank=0, world_size=1,
                               limits=SampleLimits(max_caption_bytes=50))
    metrics = evaluate_model(model, loader, tokenizer, EvalConfig(ks=[1]), torch.device("cpu"), None,
                             [0.5] * 3, [0.25] * 3).metrics
    assert metrics["retrieval/num_pairs"] == 2
    assert metrics["retrieval/skipped"] == 3
    assert {k: v for k, v in metrics.items() if k.startswith("retrieval/skipped_")} == {
        "retrieval/skipped_caption_too_long": 1, "retrieval/skipped_too_many_pixels": 1,
        "retrieval/skipped_bad_image": 1}


# ---- configuration and the command line ------------------------------------------------------------------------

def test_limits_are_typed_config_keys_and_must_be_positive(demo_env):
    from hydra import compose, initialize_config_dir

    from mmpt.cli.common import CONF_DIR
    from mmpt.engine.config import ConfigError, check_data, typed_config
    from mmpt.engine.run_setup import sample_limits

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = typed_config(compose("train", overrides=["data.max_caption_bytes=100", "data.max_empty_s=30"]))
    assert sample_limits(cfg) == SampleLimits(max_image_pixels=64_000_000, max_caption_bytes=100)
    assert cfg.data.max_empty_s == 30
    for key, default in (("max_image_pixels", 64_000_000), ("max_caption_bytes", 100), ("max_empty_s", 30)):
        setattr(cfg.data, key, 0)
        with pytest.raises(ConfigError, match=rf"^data.{key}=0 must be > 0; it bounds bad input"):
            check_data(cfg, ("pairs",))
        setattr(cfg.data, key, default)


@pytest.mark.slow  # a training subprocess
def test_training_whose_shards_are_deleted_stops_with_one_error_line(demo_env, demo_dir, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shutil.copytree(demo_dir / "train", shards)
    run_dir, max_empty_s = tmp_path / "run", 20
    cmd = [str(Path(sys.executable).parent / "mmpt-train"), "experiment=clip_tiny", "data.image_size=32",
           "data.batch_size=8", "data.num_workers=1", "data.train.shuffle_buffer=16",
           f"data.train.urls='{shards}/{{00000..00019}}.tar'", f"data.max_empty_s={max_empty_s}",
           "trainer.max_steps=100000", "trainer.log_every=1", "trainer.save_every=100000", "eval.at_end=false",
           "logger=none", "deepspeed=zero0", f"hydra.run.dir={run_dir}"]
    out_file = tmp_path / "output.txt"
    with out_file.open("w") as out:  # a file, not a pipe: nothing blocks the run while the test polls
        proc = subprocess.Popen(cmd, env=demo_env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            log = run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 120
            while not (log.is_file() and log.read_text().count("\n") >= 2):
                assert proc.poll() is None and time.monotonic() < deadline, out_file.read_text()[-3000:]
                time.sleep(0.2)
            shutil.rmtree(shards)
            deleted = time.monotonic()
            proc.wait(timeout=max_empty_s + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = out_file.read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    print(f"stopped {time.monotonic() - deleted:.1f} s after the deletion:", *errors)
    assert time.monotonic() - deleted < max_empty_s
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "all 20 shard(s) gave no samples in a row" in errors[0]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps[:2] == [1, 2]
