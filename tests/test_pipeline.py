"""WebDataset pipeline: shard specs, transforms, skip accounting, rank/worker splitting, train stream."""
from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpt.data.batch import Batch
from mmpt.data.pipeline import build_eval_loader, build_train_loader
from mmpt.data.shards import check_local_shards, expand_urls, split_shards
from mmpt.data.stream_state import LoaderState
from mmpt.data.tokenizer import TextTokenizer, train_wordpiece
from mmpt.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, decode_image

WORDS = "a red dog on the left of blue cat sits right green bird flies over small house near big tree".split()
SIZE = 16  # output image side: small keeps the tests fast on shared CPUs
MAX_LEN = 16


def caption(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(3 + i % 20))  # some exceed MAX_LEN tokens


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_wordpiece([caption(i) for i in range(50)], vocab_size=200), max_len=MAX_LEN)


def good(i: int, image_bytes, **extra) -> dict:
    color = (40 * (i % 6), 255 - 20 * (i % 10), 7 * i % 256)
    return {"__key__": f"s{i:04d}", "jpg": image_bytes(color, (24, 18)), "txt": caption(i), **extra}


def keys_of(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k in b.keys]


def total_skipped(batches: list[Batch]) -> Counter:
    out: Counter = Counter()
    for b in batches:
        out.update(b.skipped)
    return out


# ---------------------------------------------------------------- shard specs


def test_expand_brace_list_double_colon_pipe_and_remote():
    assert expand_urls("/d/{00000..00002}.tar") == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar"]
    assert expand_urls("/a/{0..1}.tar::/b/x.tar") == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    assert expand_urls(["/a/{0..1}.tar", "/b/x.tar::/c/y.tar"]) == ["/a/0.tar", "/a/1.tar", "/b/x.tar", "/c/y.tar"]
    assert expand_urls("pipe:cat /d/{0..1}.tar") == ["pipe:cat /d/0.tar", "pipe:cat /d/1.tar"]
    assert expand_urls("s3://bucket/{0..1}.tar::https://host/x.tar") == [
        "s3://bucket/0.tar", "s3://bucket/1.tar", "https://host/x.tar"]
    assert expand_urls(Path("/d/{0..1}.tar")) == ["/d/0.tar", "/d/1.tar"]
    assert expand_urls("") == [] and expand_urls([]) == []


def test_missing_shards_one_clear_error(tmp_path: Path):
    for i in (0, 1):
        (tmp_path / f"{i}.tar").write_bytes(b"")
    pattern = f"{tmp_path}/{{0..7}}.tar"
    with pytest.raises(FileNotFoundError) as err:
        check_local_shards(pattern)
    msg = str(err.value)
    assert "6 of 8" in msg and pattern in msg
    assert f"{tmp_path}/2.tar" in msg and f"{tmp_path}/6.tar" in msg and f"{tmp_path}/7.tar" not in msg
    assert "and 1 more" in msg and "mmpt-data synthetic --out DIR" in msg
    with pytest.raises(FileNotFoundError, match="expands to no shards"):
        check_local_shards(" :: ")
    check_local_shards(f"{tmp_path}/{{0..1}}.tar")  # all present
    check_local_shards(["pipe:cat /nonexistent/x.tar", "s3://b/x.tar", "https://h/x.tar"])  # not checked


def test_missing_shards_fail_at_build_time(tmp_path: Path, tokenizer):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        build_train_loader(str(tmp_path / "nope-{0..3}.tar"), tokenizer, batch_size=2, image_size=SIZE,
                           num_workers=0, seed=0, rank=0, world_size=1)


def test_split_shards_disjoint_and_complete():
    urls = [f"u{i}" for i in range(5)]
    parts = [split_shards(urls, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(u for p in parts for u in p) == urls
    assert split_shards(["only"], 1, 2, 0, 1) == []


# ---------------------------------------------------------------- transforms


def expected_constant(color: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, CLIP_MEAN, CLIP_STD)])


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_transforms_shape_and_normalization(fmt: str, image_bytes):
    color = (200, 30, 90)
    img = decode_image(image_bytes(color, (40, 25), fmt))  # lossless formats keep the colour exact
    assert img.mode == "RGB"
    for out in (TrainTransform(SIZE)(img, random.Random(0)), EvalTransform(SIZE)(img)):
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected_constant(color), atol=1e-5, rtol=0)
        assert float(out.std(dim=(1, 2)).max()) < 1e-5


def test_decode_rejects_corrupt_bytes(image_bytes):
    with pytest.raises(Exception):
        decode_image(b"definitely not an image")
    with pytest.raises(Exception):
        decode_image(image_bytes(size=(64, 64))[:200])  # truncated jpeg


def test_train_transform_seeded_and_no_flip_by_default():
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    img.paste((0, 0, 255), (16, 0, 32, 32))  # left red, right blue
    full = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the crop is the whole image: only a flip moves colours
    for seed in range(20):
        out = TrainTransform(SIZE, **full)(img, random.Random(seed))
        assert out[0, :, 0].mean() > out[2, :, 0].mean()  # left column stays red
    flipped = [TrainTransform(SIZE, hflip=True, **full)(img, random.Random(s))[0, 0, 0] < 0 for s in range(20)]
    assert any(flipped) and not all(flipped)
    a = TrainTransform(SIZE)(img, random.Random(3))
    assert torch.equal(a, TrainTransform(SIZE)(img, random.Random(3)))


# ---------------------------------------------------------------- corrupt data


def test_eval_skips_corrupt_and_counts_by_reason(write_shards, image_bytes, tokenizer, caplog):
    goods = [good(i, image_bytes) for i in range(7)]
    bad = [
        {"__key__": "bad_jpg", "jpg": b"\xff\xd8\xff garbage", "txt": "a red dog"},
        {"__key__": "bad_jpg2", "jpg": image_bytes(size=(64, 64))[:150], "txt": "a red dog"},
        {"__key__": "no_txt", "jpg": image_bytes()},
        {"__key__": "empty_txt", "jpg": image_bytes(), "txt": "  \n"},
        {"__key__": "no_image", "txt": "a cat", "json": {"image_id": 1}},
        {"__key__": "bad_json", "jpg": image_bytes(), "txt": "a cat", "json": b"{not json"},
    ]
    shard = goods[:3] + bad[:3] + goods[3:] + bad[3:]
    (url,) = write_shards([shard])
    with caplog.at_level(logging.WARNING, logger="mmpt.data.pipeline"):
        loader = build_eval_loader(url, tokenizer, batch_size=3, image_size=SIZE, num_workers=0, rank=0, world_size=1)
        batches = list(loader)
    assert keys_of(batches) == [g["__key__"] for g in goods]  # order kept, each once
    assert [len(b) for b in batches] == [3, 3, 1]
    assert total_skipped(batches) == {"bad_image": 2, "missing_caption": 2, "missing_image": 1, "bad_json": 1}
    assert loader.skipped_total == total_skipped(batches)
    # each batch carries the skips since the worker's previous batch, including those right after its own
    # last sample (a full batch leaves the worker only once the next good sample arrives), so none are lost
    assert [b.skipped for b in batches] == [
        {"bad_image": 2, "missing_caption": 1}, {}, {"missing_caption": 1, "missing_image": 1, "bad_json": 1}]
    assert sum("'bad_image'" in r.getMessage() for r in caplog.records) == 1  # warned once per reason
    # a second pass re-reads everything
    assert keys_of(list(loader)) == keys_of(batches)


def test_truncated_tar_counted_not_fatal(write_shards, image_bytes, tokenizer):
    urls = write_shards([[good(i, image_bytes) for i in range(4)], [good(i, image_bytes) for i in range(4, 8)]])
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2 + 100])
    loader = build_eval_loader(urls, tokenizer, batch_size=4, image_size=SIZE, num_workers=0, rank=0, world_size=1)
    batches = list(loader)
    keys = keys_of(batches)
    assert keys[:4] == ["s0000", "s0001", "s0002", "s0003"] and len(keys) == len(set(keys))
    assert total_skipped(batches)["bad_tar"] == 1  # once per broken shard, not once per reader error


def test_pipe_url_reads_shard(write_shards, image_bytes, tokenizer):
    (path,) = write_shards([[good(i, image_bytes) for i in range(3)]])
    batches = list(build_eval_loader(f"pipe:cat {path}", tokenizer, batch_size=8, image_size=SIZE,
                                     num_workers=0, rank=0, world_size=1))
    assert keys_of(batches) == ["s0000", "s0001", "s0002"]


# ---------------------------------------------------------------- rank / worker split


def test_eval_two_ranks_two_workers_exactly_once(write_shards, image_bytes, tokenizer):
    sizes = [3, 2, 4, 1, 3]
    shards, n = [], 0
    for s in sizes:
        shards.append([good(n + j, image_bytes, json={"image_id": f"img{(n + j) // 2}"}) for j in range(s)])
        n += s
    urls = write_shards(shards)
    seen: list[str] = []
    for rank in range(2):
        loader = build_eval_loader(urls, tokenizer, batch_size=2, image_size=SIZE, num_workers=2,
                                   rank=rank, world_size=2)
        batches = list(loader)
        for b in batches:
            assert b.image_ids == [f"img{int(k[1:]) // 2}" for k in b.keys]
        seen += keys_of(batches)
    assert sorted(seen) == [f"s{i:04d}" for i in range(n)]  # union = all, no duplicates


def test_rank_without_shards_yields_nothing(write_shards, image_bytes, tokenizer):
    (url,) = write_shards([[good(i, image_bytes) for i in range(3)]])
    kw = dict(batch_size=2, image_size=SIZE, num_workers=2, world_size=2)
    assert keys_of(list(build_eval_loader(url, tokenizer, rank=0, **kw))) == ["s0000", "s0001", "s0002"]
    assert list(build_eval_loader(url, tokenizer, rank=1, **kw)) == []


# ---------------------------------------------------------------- train stream


@pytest.fixture
def train_urls(write_shards, image_bytes) -> list[str]:
    """6 good samples in 3 shards, plus one corrupt image and one caption-less sample."""
    return write_shards([
        [good(0, image_bytes), good(1, image_bytes)],
        [good(2, image_bytes), {"__key__": "bad", "jpg": b"nope", "txt": "a dog"}, good(3, image_bytes)],
        [good(4, image_bytes), {"__key__": "no_txt", "png": image_bytes(fmt="PNG")}, good(5, image_bytes)],
    ])


def draw(urls, tokenizer, n: int, **kw) -> list[Batch]:
    args = dict(batch_size=4, image_size=SIZE, num_workers=0, seed=0, rank=0, world_size=1, shuffle_buffer=8) | kw
    it = iter(build_train_loader(urls, tokenizer, **args))
    return [next(it) for _ in range(n)]


def test_train_batches_shapes_ranges_masks(train_urls, tokenizer):
    batches = draw(train_urls, tokenizer, 10)  # 40 samples from 6 good ones: the stream is infinite
    lo = min((0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    hi = max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    for b in batches:
        assert isinstance(b, Batch) and len(b) == 4
        assert b.images.shape == (4, 3, SIZE, SIZE) and b.images.dtype == torch.float32
        assert b.input_ids.shape == b.attention_mask.shape == (4, MAX_LEN)
        assert b.input_ids.dtype == b.attention_mask.dtype == torch.long
        assert lo - 1e-4 <= float(b.images.min()) and float(b.images.max()) <= hi + 1e-4
        assert (b.input_ids[b.attention_mask == 0] == tokenizer.pad_id).all()
        assert (b.input_ids[b.attention_mask == 1] != tokenizer.pad_id).all()
        assert (b.attention_mask[:, 0] == 1).all() and (b.attention_mask.diff(dim=1) <= 0).all()  # 1s then 0s
        assert b.image_ids == b.keys and [caption(int(k[1:])) for k in b.keys] == b.captions
    assert {k for b in batches for k in b.keys} == {f"s{i:04d}" for i in range(6)}
    skipped = total_skipped(batches)
    assert set(skipped) == {"bad_image", "missing_caption"} and min(skipped.values()) >= 1


def test_train_reproducible_and_reseed_changes_stream(train_urls, tokenizer):
    a = draw(train_urls, tokenizer, 4)
    b = draw(train_urls, tokenizer, 4)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    legacy = LoaderState(world_size=1, num_workers=0, reseed=100)  # a checkpoint without stream state
    assert keys_of(draw(train_urls, tokenizer, 4, resume=legacy)) != keys_of(a)
    assert keys_of(draw(train_urls, tokenizer, 4, rank=1, world_size=2)) != keys_of(a)


def test_train_with_workers_reproducible(train_urls, tokenizer):
    a = draw(train_urls, tokenizer, 3, num_workers=2)
    b = draw(train_urls, tokenizer, 3, num_workers=2)
    assert keys_of(a) == keys_of(b) and all(torch.equal(x.images, y.images) for x, y in zip(a, b))


def test_train_fails_loudly_on_empty_shards(write_shards, tokenizer):
    urls = write_shards([[], []])
    with pytest.raises(RuntimeError, match="gave no samples"):
        draw(urls, tokenizer, 1)
