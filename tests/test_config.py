"""Config composition (Hydra, real mmpt/conf/) and validation: every bad input is one clear ConfigError."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from mmpt.cli.common import CONF_DIR
from mmpt.engine.config import ConfigError
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.ds_config import build_deepspeed_config
from mmpt.engine.run_setup import validate

SINGLE = DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")
TWO = DistEnv(0, 0, 2, "127.0.0.1", 29500, "torchrun")


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_default_composition_is_valid_and_typed(demo_env):
    prep = validate(composed(["experiment=clip_tiny"]), SINGLE)
    assert prep.cfg.model.arch == "clip" and prep.cfg.model.vision.image_size == prep.cfg.data.image_size == 64
    assert prep.cfg.model.text.vocab_size == prep.cfg.tokenizer.vocab_size
    assert prep.cfg.model.text.max_text_len == prep.cfg.data.max_text_len
    assert prep.cfg.loss.weights == {"itc": 1.0}  # the model's default weight
    assert prep.resolved["data"]["train"]["urls"].startswith(demo_env["MMPT_DEMO_DIR"])
    assert prep.trainable_params > 0 and prep.frozen_params == 0


def test_base_preset_composes(demo_env):
    cfg = composed(["model=clip/base", "data.image_size=224", "tokenizer.vocab_size=49408", "data.max_text_len=77"])
    prep = validate(cfg, SINGLE)
    m = prep.cfg.model
    assert (m.preset, m.vision.width, m.text.width, m.contrastive.embed_dim) == ("base", 768, 512, 512)
    assert abs(prep.trainable_params - 149.6e6) / 149.6e6 < 0.001  # OpenAI CLIP ViT-B/16: 149.6M


def test_deepspeed_batch_sizes_are_derived(demo_env):
    prep = validate(composed(["data.batch_size=8", "trainer.grad_accum=3", "deepspeed=zero2"]), TWO)
    ds = build_deepspeed_config(prep.cfg, world_size=2)
    assert ds["train_batch_size"] == 8 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": False}


def test_loss_weight_override_keeps_other_defaults(demo_env):
    assert validate(composed(["+loss.weights.itc=0.5"]), SINGLE).cfg.loss.weights == {"itc": 0.5}


def test_global_batch_size_derives_accumulation(demo_env):
    prep = validate(composed(["data.batch_size=8", "trainer.global_batch_size=64"]), TWO)
    assert prep.cfg.trainer.grad_accum == 4


# Each refused setting (types, ranges, unknown keys, files, combinations): tests/test_config_refusals.py


def test_typo_in_a_nested_model_key_is_refused_with_the_closest_key(demo_env):
    # every schema key exists in the composed model node: an override of an absent one is refused by Hydra
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'model\.vision\.widht'"):
        composed(["model=albef/tiny", "model.vision.widht=3"])
    # added with `+`, it reaches validation, which names it and the closest valid key of that piece
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.vision\.widht'\. Did you mean 'width'\? "
                                          r"Valid keys here: image_size, patch_size, width,"):
        validate(composed(["model=albef/tiny", "+model.vision.widht=3"]), SINGLE)
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.momentum\.enabeld'\. Did you mean 'enabled'\?"):
        validate(composed(["model=albef/tiny", "+model.momentum.enabeld=true"]), SINGLE)
    # a wrong type inside a nested key is refused against the typed preset node
    with pytest.raises(ConfigCompositionException, match=r"model\.contrastive\.temperature_init"):
        composed(["model.contrastive.temperature_init=abc"])


@pytest.mark.parametrize("overrides", [
    ["model=albef/tiny", "model.objectives=[itc]", "+loss.weights.itm=1"],
    ["experiment=albef_tiny", "model.objectives=[itc]", "+loss.weights.itm=0.25"],
])
def test_loss_weights_must_name_listed_objectives(demo_env, overrides):
    with pytest.raises(ConfigError) as err:
        validate(composed(overrides), SINGLE)
    msg = str(err.value)
    assert "loss.weights has ['itm'" in msg and "but model.objectives=['itc'] (model.arch=albef)" in msg
    assert "list the objectives in model.objectives" in msg
    # listed, the same weight is accepted and the other objectives keep their defaults
    prep = validate(composed(["model=albef/tiny", "model.objectives=[itc,itm]", "+loss.weights.itm=0.5"]), SINGLE)
    weights = prep.cfg.loss.weights
    assert prep.cfg.model.objectives == ["itc", "itm"] and weights == {"itc": 1.0, "itm": 0.5}  # no weight for mlm


def test_unset_token_ids_are_filled_from_the_tokenizer(demo_env):
    raw = composed(["model=albef/tiny"])
    assert dict(raw.model.tokens) == {"pad": None, "bos": None, "eos": None, "mask": None}
    prep = validate(raw, SINGLE)
    tok = prep.tokenizer
    want = {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "mask": tok.mask_id}
    assert vars(prep.cfg.model.tokens) == want and None not in want.values()
    assert prep.resolved["model"]["tokens"] == want  # what the run saves, so it rebuilds with the same ids
    # an id set by hand that agrees with the tokenizer is kept
    assert validate(composed(["model=albef/tiny", f"model.tokens.mask={tok.mask_id}"]), SINGLE).cfg.model.tokens.mask \
        == tok.mask_id


@pytest.mark.parametrize("key", ["mask", "pad"])
def test_hand_set_token_id_that_disagrees_with_the_tokenizer_is_refused(demo_env, key):
    prep = validate(composed(["model=albef/tiny"]), SINGLE)
    have = getattr(prep.tokenizer, f"{key}_id")
    wrong = have + 5
    with pytest.raises(ConfigError) as err:
        validate(composed(["model=albef/tiny", f"model.tokens.{key}={wrong}"]), SINGLE)
    assert str(err.value).startswith("model: ")
    assert f"model.tokens.{key}={wrong} but the tokenizer has id {have} there; set model.tokens.{key}={have}" \
        in str(err.value)


def demo_data_overrides(env: dict[str, str]) -> list[str]:
    d = env["MMPT_DEMO_DIR"]
    return [f"data.train.urls='{d}/train/{{00000..00019}}.tar'", f"tokenizer.path={d}/tokenizer.json"]


def test_paper_presets_compose_and_validate(demo_env):
    coca = validate(composed(["experiment=coca_base", *demo_data_overrides(demo_env)]), TWO)
    assert coca.cfg.model.arch == "coca" and coca.cfg.loss.weights == {"itc": 1.0, "caption": 2.0}
    assert abs(coca.trainable_params - 388.35e6) / 388.35e6 < 0.001
    assert coca.cfg.trainer.precision == "bf16" and coca.cfg.deepspeed["zero_optimization"]["stage"] == 2
    # BERT's special-token ids set by hand: our demo WordPiece tokenizer has others, and that is caught
    with pytest.raises(ConfigError, match=r"model.tokens.bos=101 but the tokenizer has id 2 there"):
        validate(composed(["experiment=albef_4m", *demo_data_overrides(demo_env), "model.tokens.bos=101"]), TWO)
    albef = validate(composed(["experiment=albef_4m", *demo_data_overrides(demo_env)]), TWO)
    assert albef.cfg.model.momentum.enabled and albef.cfg.model.momentum.queue_size == 65536
    assert albef.cfg.loss.weights == {"itc": 1.0, "itm": 1.0, "mlm": 1.0}
    assert albef.cfg.model.text.norm_first is False and albef.cfg.scheduler.min_lr_ratio == 0.1
    assert (albef.cfg.model.tokens.bos, albef.cfg.model.tokens.eos, albef.cfg.model.tokens.mask) == (2, 3, 4)


@pytest.mark.parametrize("overrides, expected", [
    (["experiment=albef_tiny", "model.momentum.enabled=true", "model.momentum.queue_size=100"],
     "multiple of the global batch"),
    (["experiment=albef_tiny", "model.momentum.enabled=true", "deepspeed=zero3"],
     "momentum teachers support ZeRO stages 0-2"),
    (["experiment=albef_tiny", "model.init.vision=/nonexistent/vit.pth"], "model.init.vision='/nonexistent/vit.pth'"),
])
def test_momentum_and_init_checks(demo_env, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(composed(overrides), TWO)


def test_preset_loss_weights_of_unlisted_objectives_are_ignored(demo_env):
    """albef/tiny weighs ITM and MLM 0.25 (model.loss_weights, a preset's default): with objectives [itc] those
    weights are dropped, not an error; the user's loss.weights are the ones that must name listed objectives."""
    full = validate(composed(["experiment=albef_tiny"]), SINGLE).cfg.loss.weights
    assert full == {"itc": 1.0, "itm": 0.25, "mlm": 0.25}
    assert validate(composed(["experiment=albef_tiny", "model.objectives=[itc]"]), SINGLE).cfg.loss.weights == {"itc": 1.0}
