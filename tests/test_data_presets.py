"""Dataset and tokenizer presets: each composes, refuses to start without its shard patterns / tokenizer file
(one clear error naming the keys), and composes once they are given."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmpt.cli.common import CONF_DIR
from mmpt.engine.config import ConfigError, check_paths, typed_config

TRAIN_ONLY = ["cc3m", "cc12m", "laion400m", "datacomp_medium"]
TRAIN_AND_EVAL = ["coco_karpathy", "flickr30k_karpathy"]


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def with_values(cfg, **values):
    """The composed config with keys set, as the command-line overrides key=value would set them."""
    cfg = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


@pytest.mark.parametrize("preset", TRAIN_ONLY + TRAIN_AND_EVAL)
def test_data_preset_refuses_without_urls_and_composes_with_them(preset):
    raw = composed([f"data={preset}"])
    with pytest.raises(ConfigError) as info:
        typed_config(raw.copy())
    message = str(info.value)
    assert "'data.train.urls'" in message and "required but not set (???)" in message
    assert ("'data.eval.urls'" in message) == (preset in TRAIN_AND_EVAL)

    train, test = f"/d/{preset}/{{00000..00009}}.tar", f"/d/{preset}_test/00000.tar"
    if preset in TRAIN_AND_EVAL:
        with pytest.raises(ConfigError, match=r"^config key 'data.eval.urls' is required but not set"):
            typed_config(with_values(raw, data__train__urls=train))  # eval.urls' schema default must not hide its ???
        cfg = typed_config(with_values(raw, data__train__urls=train, data__eval__urls=test))
    else:
        cfg = typed_config(with_values(raw, data__train__urls=train))
    assert cfg.data.train.urls == train
    assert cfg.data.eval.urls == (test if preset in TRAIN_AND_EVAL else None)
    assert (cfg.data.image_size, cfg.data.max_text_len) == (224, 77)


def test_a_preset_composes_with_urls_given_as_overrides():
    cfg = typed_config(composed(["data=coco_karpathy", "data.train.urls='/d/c/{00000..00566}.tar'",
                                 "data.eval.urls='/d/t/{00000..00004}.tar'"]))
    assert (cfg.data.train.urls, cfg.data.eval.urls) == ("/d/c/{00000..00566}.tar", "/d/t/{00000..00004}.tar")


@pytest.mark.parametrize("preset, vocab", [("bert-base-uncased", 30522), ("clip-bpe", 49408)])
def test_tokenizer_preset_needs_a_local_file(preset, vocab, tmp_path):
    raw = composed([f"tokenizer={preset}"])
    with pytest.raises(ConfigError, match=r"^config key 'tokenizer.path' is required but not set \(\?\?\?\)"):
        typed_config(raw.copy())
    cfg = typed_config(with_values(raw, tokenizer__path=f"{tmp_path}/tokenizer.json"))
    assert (cfg.tokenizer.path, cfg.tokenizer.vocab_size) == (f"{tmp_path}/tokenizer.json", vocab)
    with pytest.raises(ConfigError, match="tokenizer.path=.* does not exist"):
        check_paths(cfg)
