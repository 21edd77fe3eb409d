"""The synthetic generator: deterministic, img2dataset layout, and captions that are true of the images."""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpt.data.synthetic import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    SyntheticConfigError,
    render_sample,
    write_shards,
)
from mmpt.data.synthetic_styles import ALT

N, SHARD, SIZE = 23, 10, 64

PHRASE = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
CAPTION_RE = re.compile(rf"{PHRASE}(?: ({'|'.join(RELATIONS)}) {PHRASE})?")


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} in file order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples[key][ext] = tar.extractfile(m).read()
    return dict(samples)


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    write_shards(out, num_samples=N, shard_size=SHARD, seed=0, image_size=SIZE)
    return out


@pytest.fixture(scope="module")
def samples() -> list[tuple[bytes, str, dict]]:
    return [render_sample(seed=3, index=i, image_size=SIZE) for i in range(150)]


def test_same_seed_same_bytes_other_seed_differs(shards, tmp_path):
    write_shards(tmp_path / "again", num_samples=N, shard_size=SHARD, seed=0, image_size=SIZE)
    write_shards(tmp_path / "other", num_samples=N, shard_size=SHARD, seed=1, image_size=SIZE)
    assert dir_bytes(tmp_path / "again") == dir_bytes(shards)
    other = dir_bytes(tmp_path / "other")
    assert other.keys() == dir_bytes(shards).keys()
    assert all(other[n] != b for n, b in dir_bytes(shards).items() if n.endswith(".tar"))


def test_sizes_json_matches_tars(shards):
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sizes == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 3}
    assert sorted(p.name for p in shards.glob("*.tar")) == sorted(sizes)
    for name, count in sizes.items():
        assert len(read_tar(shards / name)) == count


def test_img2dataset_layout(shards):
    for shard in range(3):
        tar = read_tar(shards / f"{shard:05d}.tar")
        for i, (key, files) in enumerate(tar.items()):
            assert key == f"{shard:05d}{i:04d}" and len(key) == 9
            assert set(files) == {"jpg", "txt", "json"}
            meta = json.loads(files["json"])
            assert meta["key"] == key
            assert meta["caption"] == files["txt"].decode()
            assert meta["image_id"] and meta["index"] == shard * SHARD + i
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (SIZE, SIZE)


def test_tar_members_have_fixed_metadata(shards):
    with tarfile.open(shards / "00000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar} == {(0, 0, 0, "", 0o644)}


def test_start_index_gives_disjoint_held_out_set(shards, tmp_path):
    held = write_shards(tmp_path, num_samples=5, shard_size=SHARD, seed=0, image_size=SIZE, start_index=100)
    assert held == {"00010.tar": 5}
    held_samples = read_tar(tmp_path / "00010.tar")
    train = {k: v for n in ("00000.tar", "00001.tar", "00002.tar") for k, v in read_tar(shards / n).items()}
    assert not set(held_samples) & set(train)
    assert not {v["jpg"] for v in held_samples.values()} & {v["jpg"] for v in train.values()}


def test_ranges_written_separately_equal_one_run(shards, tmp_path):
    write_shards(tmp_path, num_samples=20, shard_size=SHARD, seed=0, image_size=SIZE, start_index=0)
    write_shards(tmp_path, num_samples=3, shard_size=SHARD, seed=0, image_size=SIZE, start_index=20)
    assert dir_bytes(tmp_path) == dir_bytes(shards)


def test_caption_matches_attributes(samples):
    for _, caption, meta in samples:
        m = CAPTION_RE.fullmatch(caption)
        assert m, caption
        objs = meta["objects"]
        assert len(objs) == (2 if m.group(4) else 1)
        assert m.group(1, 2, 3) == (objs[0]["size"], objs[0]["colour"], objs[0]["shape"])
        if len(objs) == 2:
            assert m.group(4) == meta["relation"]
            assert m.group(5, 6, 7) == (objs[1]["size"], objs[1]["colour"], objs[1]["shape"])
        else:
            assert meta["relation"] is None
        for o in objs:
            lo, hi = SIZES[o["size"]]
            assert lo * SIZE - 1e-2 <= o["radius"] <= hi * SIZE + 1e-2
            assert o["radius"] <= o["cx"] <= SIZE - o["radius"] and o["radius"] <= o["cy"] <= SIZE - o["radius"]


def test_relation_is_geometrically_true(samples):
    pairs = [m for _, _, m in samples if m["relation"]]
    assert {m["relation"] for m in pairs} == set(RELATIONS)
    for m in pairs:
        a, b = m["objects"]
        along, across = {
            "to the left of": (b["cx"] - a["cx"], b["cy"] - a["cy"]),
            "to the right of": (a["cx"] - b["cx"], a["cy"] - b["cy"]),
            "above": (b["cy"] - a["cy"], b["cx"] - a["cx"]),
            "below": (a["cy"] - b["cy"], a["cx"] - b["cx"]),
        }[m["relation"]]
        assert along > a["radius"] + b["radius"], m  # clear margin: the shapes do not even overlap on that axis
        assert abs(across) <= 0.5 * along + 1e-6, m  # and the relation dominates the other axis


def test_named_colour_is_drawn_at_each_centre(samples):
    for jpg, caption, meta in samples:
        pixels = np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.float32)
        candidates = {**COLOURS, "background": tuple(meta["background"])}
        for o in meta["objects"]:
            x, y = int(o["cx"]), int(o["cy"])
            patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
            nearest = min(candidates, key=lambda c: np.sum((patch - np.array(candidates[c])) ** 2))
            assert nearest == o["colour"], (caption, o, patch)


def test_two_shape_fraction_is_a_parameter(samples):
    two = sum(m["relation"] is not None for _, _, m in samples) / len(samples)
    assert 0.55 <= two <= 0.85
    assert all(render_sample(0, i, SIZE, p_two=0.0)[2]["relation"] is None for i in range(20))
    assert all(render_sample(0, i, SIZE, p_two=1.0)[2]["relation"] for i in range(20))


def test_sample_depends_only_on_seed_and_index():
    assert render_sample(5, 42, SIZE) == render_sample(5, 42, SIZE)
    assert render_sample(5, 42, SIZE)[0] != render_sample(5, 43, SIZE)[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_index": 5}, "multiple of shard_size"),
        ({"num_samples": 0}, "num_samples"),
        ({"shard_size": 20_000}, "shard_size"),
        ({"prefix": "a/b"}, "prefix"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path, kwargs, match):
    args = {"num_samples": 4, "shard_size": 10, "seed": 0, "image_size": SIZE, **kwargs}
    with pytest.raises(SyntheticConfigError, match=match):
        write_shards(tmp_path, **args)
    assert not any(tmp_path.iterdir())


# --- styles: `alt` shares the scene logic with `demo` and nothing a model could memorise --------------------

ALT_PHRASE = rf"a ({'|'.join(ALT.sizes)}) ({'|'.join(ALT.shapes)}) in ({'|'.join(ALT.colours)})"
ALT_CAPTION_RE = re.compile(rf"there is {ALT_PHRASE}(?: ({'|'.join(ALT.relations)}) {ALT_PHRASE})?")


@pytest.fixture(scope="module")
def alt_samples() -> list[tuple[bytes, str, dict]]:
    return [render_sample(seed=3, index=i, image_size=SIZE, style="alt") for i in range(150)]


def test_demo_style_is_the_default_and_unchanged():
    """Golden captions from before styles existed; the demo metadata carries no "style" key."""
    golden = [
        "a small orange circle to the right of a large purple triangle",
        "a small orange cross to the left of a large red triangle",
        "a large orange triangle above a small red square",
        "a large blue square",
    ]
    assert [render_sample(0, i, SIZE)[1] for i in range(4)] == golden
    assert render_sample(0, 1, SIZE) == render_sample(0, 1, SIZE, style="demo")
    assert "style" not in render_sample(0, 1, SIZE)[2]


def test_alt_captions_use_alt_vocabulary_only(alt_samples):
    demo_words = {*COLOURS, *SHAPES, *SIZES, "to", "the", "above", "below"}  # "left"/"right" have no synonym
    for _, caption, meta in alt_samples:
        m = ALT_CAPTION_RE.fullmatch(caption)
        assert m, caption
        assert not demo_words & set(caption.split()), caption
        objs = meta["objects"]
        assert meta["style"] == "alt" and meta["image_id"].startswith("synthetic-alt-")
        assert m.group(1, 3, 2) == (objs[0]["size"], objs[0]["colour"], objs[0]["shape"])
        if len(objs) == 2:
            assert m.group(4) == meta["relation"]
            assert m.group(5, 7, 6) == (objs[1]["size"], objs[1]["colour"], objs[1]["shape"])
    seen = {(o["colour"], o["shape"], o["size"]) for _, _, m in alt_samples for o in m["objects"]}
    assert {c for c, _, _ in seen} == set(ALT.colours) and {s for _, s, _ in seen} == set(ALT.shapes)
    assert {m["relation"] for _, _, m in alt_samples if m["relation"]} == set(ALT.relations)


def test_alt_relation_is_geometrically_true(alt_samples):
    left, right, over, beneath = ALT.relations
    for _, _, m in alt_samples:
        if not m["relation"]:
            continue
        a, b = m["objects"]
        along = {left: b["cx"] - a["cx"], right: a["cx"] - b["cx"], over: b["cy"] - a["cy"], beneath: a["cy"] - b["cy"]}
        assert along[m["relation"]] > a["radius"] + b["radius"], m


def test_alt_named_colour_is_drawn(alt_samples):
    """At the centre of filled shapes; on the band of a ring (its centre shows the background)."""
    for jpg, caption, meta in alt_samples:
        pixels = np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.float32)
        for o in meta["objects"]:
            dx = 0.8 * o["radius"] if o["shape"] == "ring" else 0.0
            x, y = int(o["cx"] + dx), int(o["cy"])
            patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
            nearest = min(ALT.colours, key=lambda c: np.sum((patch - np.array(ALT.colours[c])) ** 2))
            assert nearest == o["colour"], (caption, o, patch)


def test_alt_is_deterministic_and_differs_from_demo(tmp_path, shards):
    for name in ("a", "b"):
        write_shards(tmp_path / name, num_samples=N, shard_size=SHARD, seed=0, image_size=SIZE, style="alt")
    alt = dir_bytes(tmp_path / "a")
    assert alt == dir_bytes(tmp_path / "b")
    assert all(alt[n] != b for n, b in dir_bytes(shards).items() if n.endswith(".tar"))
    assert render_sample(0, 0, SIZE, style="alt")[0] != render_sample(0, 0, SIZE)[0]


def test_style_flag(tmp_path):
    from mmpt.cli.data import main

    assert main(["synthetic", "--out", str(tmp_path), "--num-samples", "3", "--style", "alt"]) == 0
    meta = json.loads(read_tar(tmp_path / "00000.tar")["000000000"]["json"])
    assert meta["style"] == "alt" and meta["caption"].startswith("there is ")
    with pytest.raises(SyntheticConfigError, match="style"):
        write_shards(tmp_path / "bad", num_samples=3, shard_size=10, seed=0, style="neon")
