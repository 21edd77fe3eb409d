"""Every wrong configuration is refused before launch with ONE `error:` line naming the key and the fix (exit 2).

The table holds every case of issue 14 (the ones that used to train silently, the ones that used to end in a
traceback or hang, and item 5's list) run in-process: Hydra composition of mmpt/conf/ (`composed`) plus
`validate`, which is all that runs before the process group starts, so a ConfigError here is a refusal before
launch (`mmpt-train` prints it as one `error:` line, exit 2: the console-script rows below).
Hydra's own errors go through the real `mmpt-train` entry point in-process; a few console-script runs (slow)
show the exit code and the single line end to end."""
from __future__ import annotations

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mmpt.cli.common import CONF_DIR
from mmpt.cli.train import main as train_main
from mmpt.engine.config import ConfigError
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.run_setup import validate

TWO = DistEnv(0, 0, 2, "127.0.0.1", 29500, "torchrun")
BIN = Path(sys.executable).parent


def composed(overrides: list[str]) -> DictConfig:
    """`compose("train", overrides)`, fast: Hydra composes each config-group choice (model=albef/tiny) once, and
    the key=value overrides go onto a copy through Hydra's own override step (`_apply_overrides_to_config`,
    what compose runs after the defaults list), so every row costs a validation, not a composition."""
    groups = tuple(o for o in overrides if "=" in o and (CONF_DIR / o.split("=", 1)[0]).is_dir())
    keys = [o for o in overrides if o not in groups]
    cfg = copy.deepcopy(_composed_groups(groups))
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(keys), cfg)
    return cfg


@functools.lru_cache(maxsize=None)
def _composed_groups(groups: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(groups))


def test_fast_composition_is_hydras(demo_env):
    """The shortcut above gives exactly what Hydra's compose gives, typed nodes and + included."""
    overrides = ["model=albef/tiny", "model.fusion_layers=3", "+loss.weights.itm=0.5", "data.mean=[0.5,0.5,0.5]"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        full = compose("train", overrides=overrides)
    fast = composed(overrides)
    assert OmegaConf.to_container(fast) == OmegaConf.to_container(full) and fast.model.fusion_layers == 3
    assert OmegaConf.get_type(fast.model.contrastive) is OmegaConf.get_type(full.model.contrastive)


ALBEF, COCA, VLMO, BEIT3 = "model=albef/tiny", "model=coca/tiny", "model=vlmo/tiny", "model=beit3/tiny"

# overrides -> a substring of the error (the key, and where it matters what is wrong or the fix)
REFUSED: list[tuple[list[str], str]] = [
    # ---- issue 14: accepted and trained ----
    (["model.contrastive.embed_dim=0"], "contrastive.embed_dim=0 must be >= 1"),
    (["model.vision.layers=-1"], "vision.layers=-1 must be >= 1: set model.vision.layers to a positive number"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1.0 must be a finite number >= 0"),
    (["scheduler.warmup_steps=-10"], "scheduler.warmup_steps=-10 must be >= 0"),
    (["scheduler.min_lr_ratio=5"], "scheduler.min_lr_ratio=5.0 must be in [0, 1]"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1.0 must be a finite number >= 0"),
    (["data.train.shuffle_buffer=-5"], "data.train.shuffle_buffer=-5 must be >= 0"),
    (["eval.ks=[0]"], "eval.ks=[0] must list recall cut-offs >= 1"),
    # ---- issue 14: tracebacks after launch ----
    (["optimizer.lr=-1"], "optimizer.lr=-1.0 must be a finite number >= 0"),
    (["optimizer.betas=[1.5,0.9]"], "optimizer.betas=[1.5, 0.9] must each be in [0, 1)"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["data.rrc_scale=[1.0,0.5]"], "data.rrc_scale=[1.0, 0.5] must be [min, max] with 0 < min <= max <= 1"),
    (["data.std=[0,0,0]"], "data.std=[0.0, 0.0, 0.0] must be > 0 per channel"),
    (["data.mean=[0.5,0.5]"], "data.mean=[0.5, 0.5] must be 3 finite numbers"),
    (["trainer.dist_timeout_s=0"], "trainer.dist_timeout_s=0 must be > 0 seconds"),
    # ---- data.max_text_len: hung at 0; 1-2 leave no room beside [CLS] ... [SEP] ----
    (["data.max_text_len=0"], "data.max_text_len=0 must be positive"),
    (["data.max_text_len=1"], "data.max_text_len=1 leaves no room for caption tokens: the tokenizer adds 2"),
    (["data.max_text_len=2"], "set data.max_text_len to at least 3"),
    (["model.text.max_text_len=16"], "data.max_text_len=24 exceeds the model's 16 text positions"),
    # ---- optimizer, scheduler, loss ----
    (["optimizer.lr=nan"], "optimizer.lr=nan must be a finite number"),
    (["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number"),
    (["optimizer.eps=-1e-8"], "optimizer.eps=-1e-08 must be a finite number >= 0"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas=[0.9, 1.0] must each be in [0, 1)"),
    (["optimizer.betas=[-0.1,0.9]"], "optimizer.betas=[-0.1, 0.9] must each be in [0, 1)"),
    (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] must be 2 finite numbers"),
    (["+optimizer.lr_mult.logit_scale=-2"], "optimizer.lr_mult.logit_scale=-2.0 must be a finite number >= 0"),
    (["scheduler.min_lr_ratio=-0.1"], "scheduler.min_lr_ratio=-0.1 must be in [0, 1]"),
    (["+loss.weights.itc=-1"], "loss.weights.itc=-1.0 must be a finite number >= 0"),
    # ---- data ----
    (["data.rrc_scale=[0.0,1.0]"], "data.rrc_scale=[0.0, 1.0] must be [min, max] with 0 < min"),
    (["data.rrc_scale=[0.5,1.5]"], "data.rrc_scale=[0.5, 1.5] must be [min, max]"),
    (["data.rrc_scale=[0.5]"], "data.rrc_scale=[0.5] must be 2 finite numbers"),
    (["data.mean=[0.5,0.5,0.5,0.5]"], "data.mean=[0.5, 0.5, 0.5, 0.5] must be 3 finite numbers"),
    (["data.std=[0.2,0.2]"], "data.std=[0.2, 0.2] must be 3 finite numbers"),
    (["data.std=[0.2,-0.1,0.2]"], "data.std=[0.2, -0.1, 0.2] must be > 0 per channel"),
    (["data.image_size=0"], "data.image_size=0 must be positive"),
    (["data.batch_size=0"], "data.batch_size=0 must be positive"),
    # ---- trainer, eval ----
    (["trainer.dist_timeout_s=-5"], "trainer.dist_timeout_s=-5 must be > 0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be positive"),
    (["eval.ks=[1,-5]"], "eval.ks=[1, -5] must list recall cut-offs >= 1"),
    (["eval.ks=[]"], "eval.ks=[] must list recall cut-offs >= 1"),
    (["eval.rerank_k=-1"], "eval.rerank_k=-1 must be >= 0"),
    (["trainer.expected_world_size=-8"], "trainer.expected_world_size=-8 must be >= 1, or null"),
    # ---- model geometry: one check per shared dataclass (tower, patch grid, text input), every architecture ----
    (["model.vision.width=0"], "vision.width=0 must be >= 1"),
    (["model.vision.heads=0"], "vision.heads=0 must be >= 1"),
    (["model.vision.patch_size=0"], "vision.patch_size=0 must be >= 1"),
    (["model.vision.image_size=0"], "vision.image_size=0 must be >= 1"),
    (["model.vision.mlp_ratio=0"], "vision.mlp_ratio=0.0 must be > 0"),
    (["model.text.layers=0"], "text.layers=0 must be >= 1"),
    (["model.text.heads=-2"], "text.heads=-2 must be >= 1"),
    (["model.text.vocab_size=0"], "text.vocab_size=0 must be >= 1: set model.text.vocab_size"),
    (["model.text.max_text_len=0"], "text.max_text_len=0 must be >= 1"),
    (["model.text.norm_eps=0"], "text.norm_eps=0.0 must be > 0"),
    ([ALBEF, "model.fusion_layers=0"], "fusion_layers=0 must be >= 1 for itm/mlm"),
    ([ALBEF, "model.objectives=[itc]", "model.fusion_layers=-1"], "fusion_layers=-1 must be >= 1 for itm/mlm (>= 0"),
    ([ALBEF, "model.vision.width=-8"], "vision.width=-8 must be >= 1"),
    ([ALBEF, "model.momentum.queue_size=0"], "momentum.queue_size=0 must be positive"),
    ([COCA, "model.multimodal_layers=0"], "multimodal_layers=0 must be >= 1"),
    ([COCA, "model.init_std=0"], "init_std=0.0 must be in (0, 1]"),
    (["model.init_std=2"], "init_std=2.0 must be in (0, 1]"),
    ([COCA, "model.num_decoder_queries=0"], "num_decoder_queries=0 must be >= 1"),
    ([COCA, "model.vision.layers=0"], "vision.layers=0 must be >= 1"),
    ([COCA, "model.contrastive.embed_dim=-1"], "contrastive.embed_dim=-1 must be >= 1"),
    ([VLMO, "model.multiway.layers=0"], "multiway.layers=0 must be >= 1"),
    ([VLMO, "model.multiway.heads=0"], "multiway.heads=0 must be >= 1"),
    ([VLMO, "model.multiway.patch_size=0"], "multiway.patch_size=0 must be >= 1"),
    ([VLMO, "model.multiway.vocab_size=0"], "multiway.vocab_size=0 must be >= 1"),
    ([VLMO, "model.multiway.vl_layers=-1"], "multiway.vl_layers=-1 must be in [0, layers=2]"),
    ([BEIT3, "model.multiway.width=0"], "multiway.width=0 must be >= 1"),
    ([BEIT3, "model.multiway.max_text_len=0"], "multiway.max_text_len=0 must be >= 1"),
    ([BEIT3, "model.multiway.ffn_dim=-5"], "multiway.ffn_dim=-5 must be >= 1, or null"),
    ([BEIT3, "model.multiway.width=66", "model.multiway.heads=4"], "multiway.width=66 must be divisible by multiway.heads=4"),
    # ---- folded from tests/test_config.py: types, unknown keys, files, combinations ----
    (["+trainer.max_stpes=5"], "unknown config key 'trainer.max_stpes'. Did you mean 'max_steps'?"),
    (["trainer.max_steps=abc"], "trainer.max_steps' has a wrong type"),
    (["+model.widht=3"], "unknown config key 'model.widht'"),
    (["+model.vision.widht=3"], "unknown config key 'model.vision.widht'. Did you mean 'width'?"),
    (["data.train.urls='/nonexistent/{00000..00003}.tar'"], "data.train.urls: 4 of 4 shard(s)"),
    (["tokenizer.path=/nonexistent/tok.json"], "tokenizer.path='/nonexistent/tok.json' does not exist"),
    (["tokenizer.vocab_size=10"], "set tokenizer.vocab_size="),
    (["data.batch_size=8", "trainer.global_batch_size=20"], "not divisible by data.batch_size x world size"),
    (["trainer.precision=fp16"], "needs a GPU"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid"),
    (["eval.rerank_score=sum"], "eval.rerank_score='sum' is not valid; choose one of itm, itm+itc, itm+itc_logit"),
    (["eval.rerank_min_itm=1.5"], "eval.rerank_min_itm=1.5 a probability in [0, 1]"),
    (["+deepspeed.train_batch_size=64"], "deepspeed.train_batch_size is derived by mmpt"),
    (["+loss.weights.mlm=1.0"], "loss.weights has ['mlm'] but model.objectives=['itc']"),
    (["data.image_size=60"], "vision.image_size=60 must be a multiple of vision.patch_size=8"),
    (["model.vision.image_size=32"], "model image_size=32 but data.image_size=64; make them equal"),
    (["trainer.resume=/nonexistent/ckpt"], "no such checkpoint directory"),
    (["model.arch=albatross"], "not a known architecture"),
]


def _id(row: tuple[list[str], str]) -> str:
    return " ".join(row[0])


@pytest.mark.parametrize("overrides, expected", REFUSED, ids=[_id(r) for r in REFUSED])
def test_refused_before_launch_with_one_line_naming_the_key(demo_env, overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(composed(overrides), TWO)  # everything that runs before the process group
    message = str(err.value)
    assert expected in message and "\n" not in message, message


def test_the_table_holds_every_case_of_the_issue():
    """Issue 14 counts 45 wrong configurations; each named one is a row here (or a Hydra row below)."""
    named = ["model.contrastive.embed_dim=0", "model.vision.layers=-1", "trainer.grad_clip=-1",
             "scheduler.warmup_steps=-10", "scheduler.min_lr_ratio=5", "optimizer.weight_decay=-1",
             "data.train.shuffle_buffer=-5", "eval.ks=[0]", "optimizer.lr=-1", "optimizer.betas=[1.5,0.9]",
             "data.num_workers=-1", "data.rrc_scale=[1.0,0.5]", "data.std=[0,0,0]", "data.mean=[0.5,0.5]",
             "trainer.dist_timeout_s=0", "data.max_text_len=0"]
    rows = {override for overrides, _ in REFUSED for override in overrides}
    assert not [n for n in named if n not in rows] and len(REFUSED) + len(HYDRA_REFUSED) >= 45


def test_valid_edges_are_accepted(demo_env):
    """The bounds are where they should be: zeros that mean "off" and the closed ends of each range pass."""
    prep = validate(composed(["trainer.grad_clip=0", "scheduler.warmup_steps=0", "scheduler.min_lr_ratio=1",
                              "optimizer.weight_decay=0", "optimizer.betas=[0,0.999]", "data.num_workers=0",
                              "data.train.shuffle_buffer=0", "data.rrc_scale=[0.08,1.0]", "eval.ks=[1]",
                              "data.max_text_len=3", "model.text.max_text_len=32"]), TWO)
    cfg = prep.cfg
    assert (cfg.trainer.grad_clip, cfg.scheduler.min_lr_ratio, cfg.data.max_text_len, cfg.eval.ks) == (0.0, 1.0, 3, [1])
    assert prep.tokenizer(["a red circle"])[0].shape == (1, 3)  # [CLS] word [SEP]: max_text_len 3 is usable
    # ALBEF with ITC alone builds no fusion stack: fusion_layers=0 is valid there
    assert validate(composed([ALBEF, "model.objectives=[itc]", "model.fusion_layers=0"]), TWO).cfg.model.fusion_layers == 0


# ---- Hydra's own errors, through the real entry point (in-process: Hydra composes, the error comes first) -------
HYDRA_REFUSED: list[tuple[list[str], tuple[str, ...]]] = [  # argv -> the line starts with [0], holds the rest
    (["model=clip/huge"], ("error: model=clip/huge: no config 'clip/huge' in group 'model'; available: albef/base,",)),
    (["deepspeed=zero9"], ("error: deepspeed=zero9: no config 'zero9' in group 'deepspeed'; available: zero0, zero1, "
                           f"zero2, zero3 (configs from {CONF_DIR}; add your own as $MMPT_CONF_DIR/deepspeed/NAME.yaml)",)),
    (["experiment=nope"], ("error: experiment=nope: no config 'nope' in group 'experiment'; available: albef_4m,",)),
    (["trainer.max_stpes=5"], ("error: unknown config key 'trainer.max_stpes' (override 'trainer.max_stpes=5'). "
                               "Did you mean 'trainer.max_steps' or 'trainer.max_bad_steps'? Valid keys in trainer: ",
                               ". To add a new key, write +trainer.max_stpes=5")),
    (["model.vision.widht=3"], ("error: unknown config key 'model.vision.widht' (override 'model.vision.widht=3'). "
                                "Did you mean 'model.vision.width'? Valid keys in model.vision: dropout, heads, "
                                "image_size, layers, ", "To add a new key, write +model.vision.widht=3")),
    (["model.embed_dim=0"], ("error: unknown config key 'model.embed_dim'",)),  # issue 14's spelling: not a key
    (["model.vision_layers=-1"], ("error: unknown config key 'model.vision_layers'",)),
    (["+trainer.max_steps=3"], ("error: '+trainer.max_steps=3': trainer.max_steps already exists, so it cannot be "
                                "added with +; set it with trainer.max_steps=3 (or ++trainer.max_steps=3 to add or set)",)),
    (["~trainer.nope"], ("error: cannot delete 'trainer.nope': no such key",)),
    (["trainer=[a"], ("error: cannot parse override 'trainer=[a': no viable alternative at input '[a'. Quote a value",
                      "(override grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")),
    (["=3"], ("error: cannot parse override '=3': an override is key=value and this one has no key",)),
    (["model.contrastive.temperature_init=abc"],
     ("error: config key 'model.contrastive.temperature_init' has a wrong type or value: Value 'abc' of type 'str' "
      "could not be converted to Float (override 'model.contrastive.temperature_init=abc')",)),
    (["model=clip/tiny,albef/tiny"], ("error: 'model=clip/tiny,albef/tiny': a value with commas is ambiguous; "
                                      "write model=[clip/tiny,albef/tiny] for a list",)),
    (["+model=clip/tiny"], ("error: '+model=clip/tiny': config group 'model' is already chosen by the defaults, so + "
                            "would add it twice; select the option with model=clip/tiny",)),
    (["--config-name", "nope"], ("error: --config-name nope: no primary config 'nope'; available: train",)),
]


@pytest.mark.parametrize("argv, expected", HYDRA_REFUSED, ids=[_id(r) for r in HYDRA_REFUSED])
def test_hydra_errors_are_one_line_naming_the_fix(monkeypatch, capsys, tmp_path, argv, expected):
    monkeypatch.delenv("MMPT_CONF_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", ["mmpt-train", *argv, "trainer.dry_run=true", f"hydra.run.dir={tmp_path}/run"])
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(expected[0]) and all(part in lines[0] for part in expected[1:]), lines[0]


# ---- the console script end to end: exit 2, one line, nothing trained ------------------------------------------
@pytest.mark.slow  # a CLI subprocess each (~4 s)
@pytest.mark.parametrize("override, expected", [
    ("model=clip/huge", "error: model=clip/huge: no config 'clip/huge' in group 'model'; available: "),
    ("model.contrastive.temperature_init=abc", "error: config key 'model.contrastive.temperature_init' has a wrong"),
    ("data.max_text_len=0", "error: data.max_text_len=0 must be positive"),  # hung until killed before
])
def test_console_script_refuses_with_exit_2_and_one_line(demo_env, tmp_path, override, expected):
    proc = subprocess.run([str(BIN / "mmpt-train"), override, "logger=none", f"hydra.run.dir={tmp_path}/run"],
                          env=demo_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
