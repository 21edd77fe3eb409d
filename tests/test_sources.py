"""Multi-source data: Batch kinds, MixedBatch, per-source counts, mixed loaders over real tars and .txt files,
rank/worker splitting, image masks in the workers, and the config checks before launch."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mmpt.cli.common import CONF_DIR
from mmpt.data.batch import Batch, MixedBatch
from mmpt.data.masking import BlockMasker
from mmpt.data.pipeline import build_train_loader
from mmpt.data.sources import SourceSpec, build_mixed_train_loader, source_counts
from mmpt.data.stream_state import LoaderState
from mmpt.data.tokenizer import TextTokenizer, train_wordpiece
from mmpt.engine.config import ConfigError, TrainConfig, image_masker
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.run_setup import build_train_loader_for, validate
from mmpt.models.clip import CLIP

SIZE = 32  # 4 x 4 patches of 8 px
MASKER = BlockMasker(4, 4, num_masked=6, min_patches=2)
WORDS = "pair image text line caption shard corpus number one two three four five six seven".split()


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_wordpiece([" ".join(WORDS)] * 3, vocab_size=120), max_len=12)


def pair(i: int, image_bytes) -> dict:
    return {"__key__": f"p{i:03d}", "jpg": image_bytes((10 * i % 256, 80, 200)), "txt": f"pair caption {i}"}


def image_only(i: int, image_bytes, **extra) -> dict:
    return {"__key__": f"i{i:03d}", "png": image_bytes((200, 10 * i % 256, 30), fmt="PNG"), **extra}


def text_only(i: int) -> dict:
    return {"__key__": f"t{i:03d}", "txt": f"text shard {i}"}


@pytest.fixture
def data(write_shards, image_bytes, tmp_path: Path) -> dict[str, list[str]]:
    """pairs: 4 shards x 3; images: 2 shards x 3 (some with an ignored .txt or a json image_id); texts: 2 tar
    shards x 3; corpus.txt: 7 non-empty lines among blank ones."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("line one\n\nline two\nline three\n   \nline four\nline five\nline six\n\nline seven")
    return {
        "pairs": write_shards([[pair(3 * s + j, image_bytes) for j in range(3)] for s in range(4)], name="pairs"),
        "images": write_shards([[image_only(0, image_bytes, txt="ignored"), image_only(1, image_bytes),
                                 image_only(2, image_bytes, json={"image_id": "img2"})],
                                [image_only(3 + j, image_bytes) for j in range(3)]], name="images"),
        "texts": write_shards([[text_only(3 * s + j) for j in range(3)] for s in range(2)], name="texts"),
        "corpus": [str(corpus)],
    }


def specs_of(data: dict[str, list[str]]) -> list[SourceSpec]:
    # weights 2 : 1 : 0.5 : 0.5 of 8 -> 4 pairs, 2 images, 1 + 1 texts (tar source first, then corpus.txt)
    return [SourceSpec("cc", "pairs", data["pairs"], 2.0), SourceSpec("img", "images", data["images"], 1.0),
            SourceSpec("tar_texts", "texts", data["texts"], 0.5), SourceSpec("wiki", "texts", data["corpus"], 0.5)]


def mixed(specs, tokenizer, steps: int, **kw) -> list[MixedBatch]:
    args = dict(batch_size=8, image_size=SIZE, num_workers=0, seed=0, rank=0, world_size=1, shuffle_buffer=4,
                image_mask=MASKER) | kw
    it = iter(build_mixed_train_loader(specs, tokenizer, **args))
    return [next(it) for _ in range(steps)]


def keys(batches: list[MixedBatch], kind: str) -> list[str]:
    return [k for b in batches for k in b.parts[kind].keys]


# ---------------------------------------------------------------- Batch / MixedBatch


def test_batch_kinds_len_and_to():
    images, ids, mask = torch.randn(3, 3, 8, 8), torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    image_mask = torch.tensor([[True, False], [False, True], [True, True]])
    assert Batch(images, ids, mask).kind == "pairs"
    only_images = Batch(images=images, image_mask=image_mask)
    only_texts = Batch(input_ids=ids, attention_mask=mask)
    assert (only_images.kind, len(only_images), only_texts.kind, len(only_texts)) == ("images", 3, "texts", 3)
    moved = only_images.to("cpu", torch.bfloat16)
    assert moved.images.dtype == torch.bfloat16 and moved.image_mask.dtype == torch.bool
    assert torch.equal(moved.image_mask, image_mask) and moved.input_ids is None
    assert only_texts.to("cpu", torch.bfloat16).input_ids.dtype == torch.long


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs images, input_ids or both"),
    ({"input_ids": torch.ones(2, 4, dtype=torch.long)}, "must be given together"),
    ({"images": torch.randn(2, 3, 8, 8), "input_ids": torch.ones(3, 4), "attention_mask": torch.ones(3, 4)},
     "disagree on the batch size"),
    ({"input_ids": torch.ones(2, 4), "attention_mask": torch.ones(2, 4), "image_mask": torch.ones(2, 4).bool()},
     "image_mask (`b n`) needs images"),
])
def test_batch_rejects_malformed_input(kwargs, message):
    with pytest.raises(ValueError) as err:
        Batch(**kwargs)
    assert message in str(err.value)


def test_mixed_batch_len_skipped_and_to():
    pairs = Batch(torch.randn(2, 3, 8, 8), torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
                  skipped={"bad_image": 1, "bad_tar": 2})
    texts = Batch(input_ids=torch.ones(3, 4, dtype=torch.long), attention_mask=torch.ones(3, 4, dtype=torch.long),
                  skipped={"bad_image": 4})
    batch = MixedBatch({"pairs": pairs, "texts": texts})
    assert len(batch) == 5 and batch.skipped == {"bad_image": 5, "bad_tar": 2}
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.parts["pairs"].images.dtype == torch.bfloat16 and moved.parts["texts"].images is None
    with pytest.raises(ValueError, match="keyed by their kind"):
        MixedBatch({"images": pairs})


# ---------------------------------------------------------------- per-source counts


@pytest.mark.parametrize("weights, batch_size, expected", [
    ([2, 1, 1], 8, [4, 2, 2]),
    ([1, 1, 1], 8, [3, 3, 2]),  # 2.67 each: the two leftover samples go to the earliest sources
    ([1, 1, 1], 64, [22, 21, 21]),
    ([0.7, 0.2, 0.1], 10, [7, 2, 1]),  # float weights whose quotas are not exact still give 7, 2, 1
    ([5, 1], 4, [3, 1]),  # 3.33, 0.67: the remainder goes to the larger fraction
    ([10, 1], 4, [4, 0]),  # 3.64, 0.36
])
def test_source_counts_largest_remainder(weights, batch_size, expected):
    assert source_counts(weights, batch_size) == expected


# ---------------------------------------------------------------- mixed loader


def test_mixed_batches_have_fixed_per_kind_counts_and_masks(data, tokenizer):
    corpus = [line.strip() for line in Path(data["corpus"][0]).read_text().splitlines()]
    batches = mixed(specs_of(data), tokenizer, 12)
    for b in batches:
        assert isinstance(b, MixedBatch) and list(b.parts) == ["pairs", "images", "texts"] and len(b) == 8
        p, i, t = b.parts["pairs"], b.parts["images"], b.parts["texts"]
        assert (len(p), len(i), len(t)) == (4, 2, 2)
        assert p.images.shape == (4, 3, SIZE, SIZE) and p.input_ids.shape == (4, 12)
        assert i.images.shape == (2, 3, SIZE, SIZE) and i.input_ids is None and i.captions == []
        assert t.images is None and t.image_mask is None and t.input_ids.shape == t.attention_mask.shape == (2, 12)
        for part in (p, i):
            assert part.image_mask.dtype == torch.bool and part.image_mask.shape == (len(part), 16)
            assert part.image_mask.sum(dim=1).tolist() == [6] * len(part)
        assert p.captions == [f"pair caption {int(k[1:])}" for k in p.keys]
        # two texts sources concatenated in config order: 1 from the tar shards, then 1 from corpus.txt
        assert t.keys[0].startswith("t") and t.captions[0] == f"text shard {int(t.keys[0][1:])}"
        name, number = t.keys[1].split(":")
        assert name == "corpus.txt" and t.captions[1] == corpus[int(number) - 1]
    assert set(keys(batches, "images")) == {f"i{j:03d}" for j in range(6)}
    image_ids = {k: iid for b in batches for k, iid in zip(b.parts["images"].keys, b.parts["images"].image_ids)}
    assert image_ids["i002"] == "img2" and image_ids["i000"] == "i000"  # json image_id wins, else the key
    assert {c for b in batches for c in b.parts["texts"].captions} >= {"line one", "line seven"}
    assert "" not in {c for b in batches for c in b.parts["texts"].captions}  # blank lines are not samples


def test_two_ranks_never_share_a_sample(data, tokenizer):
    specs = specs_of(data)
    per_rank = [mixed(specs, tokenizer, 40, rank=r, world_size=2) for r in range(2)]
    for kind, total in (("pairs", 12), ("images", 6), ("texts", 6 + 7)):
        seen = [set(keys(batches, kind)) for batches in per_rank]
        assert not seen[0] & seen[1], kind
        assert len(seen[0] | seen[1]) == total, kind  # together they cover the data
    # corpus.txt: rank 0 keeps the 1st, 3rd, ... non-empty line, rank 1 the 2nd, 4th, ... (file line numbers)
    lines = [{k for k in keys(batches, "texts") if k.startswith("corpus")} for batches in per_rank]
    assert lines == [{f"corpus.txt:{n}" for n in (1, 4, 7, 10)}, {f"corpus.txt:{n}" for n in (3, 6, 8)}]


def test_fewer_shards_than_ranks_warns_and_shares(data, tokenizer, caplog):
    specs = [SourceSpec("img", "images", data["images"][:1], 1.0)]
    with caplog.at_level(logging.WARNING, logger="mmpt.data.sources"):
        per_rank = [mixed(specs, tokenizer, 6, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert any("every slot draws from all of them" in r.getMessage() for r in caplog.records)
    assert set(keys(per_rank[0], "images")) == set(keys(per_rank[1], "images")) == {"i000", "i001", "i002"}


def test_workers_split_text_lines_and_carry_masks(data, tokenizer):
    specs = [SourceSpec("wiki", "texts", data["corpus"], 1.0), SourceSpec("img", "images", data["images"], 1.0)]
    batches = mixed(specs, tokenizer, 8, batch_size=2, num_workers=2)  # batches alternate worker 0, 1
    parity = [{(int(k.split(":")[1]) in (1, 4, 7, 10)) for k in b.parts["texts"].keys} for b in batches]
    assert parity == [{True}, {False}] * 4
    assert all(b.parts["images"].image_mask.sum(dim=1).tolist() == [6] for b in batches)


def test_reproducible_and_legacy_resume_reseeds(data, tokenizer):
    a, b = mixed(specs_of(data), tokenizer, 5), mixed(specs_of(data), tokenizer, 5)
    for kind in ("pairs", "images", "texts"):
        assert keys(a, kind) == keys(b, kind)
    assert all(torch.equal(x.parts["images"].image_mask, y.parts["images"].image_mask) for x, y in zip(a, b))
    assert all(torch.equal(x.parts["pairs"].images, y.parts["pairs"].images) for x, y in zip(a, b))
    resumed = mixed(specs_of(data), tokenizer, 5, resume=LoaderState(world_size=1, num_workers=0, reseed=100))
    assert keys(resumed, "pairs") != keys(a, "pairs")


def test_bad_samples_are_counted_in_their_part(write_shards, image_bytes, data, tokenizer):
    bad_images = write_shards([[image_only(0, image_bytes), {"__key__": "bad", "jpg": b"not a jpeg"},
                                {"__key__": "no_image", "txt": "only text"}, image_only(1, image_bytes)]],
                              name="bad_images")
    bad_texts = write_shards([[text_only(0), {"__key__": "no_txt", "json": {"a": 1}}, text_only(1)]],
                             name="bad_texts")
    specs = [SourceSpec("img", "images", bad_images, 1.0), SourceSpec("txt", "texts", bad_texts, 1.0)]
    loader = build_mixed_train_loader(specs, tokenizer, batch_size=2, image_size=SIZE, num_workers=0, seed=0,
                                      rank=0, world_size=1, shuffle_buffer=1)
    it = iter(loader)
    batches = [next(it) for _ in range(10)]
    image_skips, text_skips = Counter(), Counter()
    for b in batches:
        image_skips.update(b.parts["images"].skipped)
        text_skips.update(b.parts["texts"].skipped)
        assert b.parts["images"].image_mask is None  # masking off
    assert set(image_skips) == {"bad_image", "missing_image"} and set(text_skips) == {"missing_caption"}
    assert loader.skipped_total == image_skips + text_skips
    assert set(keys(batches, "images")) == {"i000", "i001"} and set(keys(batches, "texts")) == {"t000", "t001"}


def test_single_source_pairs_loader_carries_masks(data, tokenizer):
    batch = next(iter(build_train_loader(data["pairs"], tokenizer, batch_size=4, image_size=SIZE, num_workers=0,
                                         seed=0, rank=0, world_size=1, image_mask=MASKER)))
    assert isinstance(batch, Batch) and batch.kind == "pairs"
    assert batch.image_mask.shape == (4, 16) and batch.image_mask.sum(dim=1).tolist() == [6] * 4
    plain = next(iter(build_train_loader(data["pairs"], tokenizer, batch_size=4, image_size=SIZE, num_workers=0,
                                         seed=0, rank=0, world_size=1)))
    assert plain.image_mask is None and plain.keys == batch.keys  # the mask draws do not shift the stream


# ---------------------------------------------------------------- config checks (before launch)

SINGLE = DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")
TWO = DistEnv(0, 0, 2, "127.0.0.1", 29500, "torchrun")


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def all_kinds_clip(monkeypatch):
    """CLIP pretending to use every kind, so the mixed demo passes the model check (no such model here yet)."""
    monkeypatch.setattr(CLIP, "data_kinds", ("pairs", "images", "texts"), raising=False)


def test_mixed_demo_validates_and_builds_mixed_batches(demo_env, all_kinds_clip):
    prep = validate(composed(["data=mixed_demo", "data.num_workers=0", "data.train.shuffle_buffer=8"]), TWO)
    assert [s.kind for s in prep.cfg.data.sources] == ["pairs", "images", "texts"]
    batch = next(iter(build_train_loader_for(prep.cfg, prep.tokenizer, SINGLE)))
    assert isinstance(batch, MixedBatch) and {k: len(v) for k, v in batch.parts.items()} == {
        "pairs": 32, "images": 16, "texts": 16}
    assert batch.parts["images"].image_mask.shape == (16, 64)  # 64 px / patch 8
    assert batch.parts["pairs"].image_mask.sum(dim=1).tolist() == [26] * 32  # round(0.4 * 64)


def test_sources_replace_a_required_train_pattern(demo_env):
    source = f"{{name: cc, kind: pairs, urls: '{demo_env['MMPT_DEMO_DIR']}/train/{{00000..00001}}.tar'}}"
    prep = validate(composed(["data=webdataset", "data.image_size=64", f"+data.sources=[{source}]"]), TWO)
    assert prep.cfg.data.train.urls is None and [s.name for s in prep.cfg.data.sources] == ["cc"]


def test_default_data_path_still_yields_plain_pair_batches(demo_env):
    prep = validate(composed(["data.num_workers=0", "data.batch_size=4", "data.train.shuffle_buffer=4"]), SINGLE)
    batch = next(iter(build_train_loader_for(prep.cfg, prep.tokenizer, SINGLE)))
    assert isinstance(batch, Batch) and batch.kind == "pairs" and batch.image_mask is None and len(batch) == 4


@pytest.mark.parametrize("overrides, expected", [
    ([], "model.arch=clip trains on ['pairs'] data but the config feeds it ['images', 'texts'] (data.sources)"),
    (["data.sources.1.kind=audio"], "data.sources[1] ('images').kind='audio' is not a data kind"),
    (["data.sources.2.weight=0"], "data.sources[2] ('texts').weight=0.0 must be > 0"),
    (["data.sources.2.weight=0.01"], "gets 0 of the 64 samples per micro-batch"),
    (["data.sources.0.urls='/nonexistent/{0..1}.tar'"], "data.sources[0] ('pairs').urls: 2 of 2 shard(s)"),
    (["data.sources.1.urls=/tmp/corpus.txt"], "plain text files ('/tmp/corpus.txt') hold texts only"),
    (["data.sources.1.name=pairs"], "names must be unique; ['pairs']"),
    (["+data.sources.2.wieght=1"], "unknown config key 'data.sources[2].wieght'. Did you mean 'weight'?"),
    (["data.sources.1.urls=null"], "data.sources[1].urls is not set"),
    (["data.sources.1.weight=heavy"], "data.sources[1].weight='heavy' must be a number"),
    (["data.image_mask.patch_size=12"], "data.image_mask.patch_size=12 but the model's patch_size=8: the masks would "
                                        "not line up with the patches; make them equal"),
    (["data.image_mask.patch_size=16"], "data.image_mask.patch_size=16 but the model's patch_size=8"),
    (["data.image_mask.min_patches=30"], "min_patches=30 exceeds the 26 masked patches"),
    (["data.image_mask.num_masked=65"], "data.image_mask: num_masked=65 must be in [0, 64]"),
])
def test_source_and_mask_errors(demo_env, monkeypatch, overrides, expected):
    if overrides:  # every case but the first checks the data, so let the model accept all kinds
        monkeypatch.setattr(CLIP, "data_kinds", ("pairs", "images", "texts"), raising=False)
    with pytest.raises(ConfigError) as err:
        validate(composed(["data=mixed_demo", *overrides]), TWO)
    assert expected in str(err.value)


def test_image_mask_patch_that_does_not_divide_the_image_is_refused_by_the_masker():
    # validate() stops earlier at the model's patch-size check; the masker itself refuses it too
    cfg = TrainConfig()
    cfg.data.image_mask.enabled, cfg.data.image_mask.patch_size = True, 12
    with pytest.raises(ConfigError, match=r"data.image_mask.patch_size=12 does not divide data.image_size=64"):
        image_masker(cfg)


def test_model_without_pairs_refuses_the_default_train_data(demo_env, monkeypatch):
    monkeypatch.setattr(CLIP, "data_kinds", ("images",), raising=False)
    with pytest.raises(ConfigError, match=r"trains on \['images'\] data but the config feeds it \['pairs'\]"):
        validate(composed([]), TWO)
