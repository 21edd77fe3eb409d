"""MMPT_CONF_DIR: a user's config folder whose groups are found alongside and ahead of the shipped mmpt/conf/
(mmpt-train through hydra.main, the compose API, mmpt-sweep), and sweep specs found by name."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmpt.cli.common import CONF_DIR
from mmpt.cli.sweep import main as sweep_main
from mmpt.cli.train import main as train_main

MY_EXPERIMENT = """# @package _global_
defaults:
  - override /model: clip/mine
trainer:
  max_steps: 7
"""


@pytest.fixture
def user_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """experiment/my.yaml (new), model/clip/mine.yaml (new, 48 wide), trainer/default.yaml (shadows the shipped
    one: log_every 3) and sweep/my_sweep.yaml; MMPT_CONF_DIR points at it."""
    root = tmp_path / "my_conf"
    (root / "experiment").mkdir(parents=True)
    (root / "experiment" / "my.yaml").write_text(MY_EXPERIMENT)
    (root / "model" / "clip").mkdir(parents=True)
    mine = (CONF_DIR / "model" / "clip" / "tiny.yaml").read_text().replace("vision:\n", "vision:\n  width: 48\n")
    (root / "model" / "clip" / "mine.yaml").write_text(mine)
    (root / "trainer").mkdir()
    trainer = yaml.safe_load((CONF_DIR / "trainer" / "default.yaml").read_text())
    assert trainer["log_every"] != 3
    (root / "trainer" / "default.yaml").write_text(yaml.safe_dump({**trainer, "log_every": 3}))
    (root / "sweep").mkdir()
    spec = yaml.safe_load((CONF_DIR / "sweep" / "clip_tiny_lr.yaml").read_text())
    spec["command"] = ["${env}", "mmpt-train", "experiment=my", "${args_no_hyphens}"]
    (root / "sweep" / "my_sweep.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("MMPT_CONF_DIR", str(root))
    return root


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_user_groups_are_found_and_shadow_the_shipped_ones(user_conf):
    cfg = composed(["experiment=my"])
    assert cfg.trainer.max_steps == 7 and cfg.trainer.log_every == 3
    assert cfg.model.vision.width == 48 and cfg.model.arch == "clip"
    shipped = composed(["experiment=clip_tiny"])  # the shipped groups are still there
    assert shipped.trainer.max_steps == 2500 and shipped.trainer.log_every == 50


def test_without_the_variable_only_the_shipped_configs_count(user_conf, monkeypatch):
    monkeypatch.delenv("MMPT_CONF_DIR")
    assert composed([]).trainer.log_every != 3
    with pytest.raises(Exception, match="experiment/my"):
        composed(["experiment=my"])


def test_mmpt_train_composes_with_the_user_folder(user_conf, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mmpt-train", "--cfg", "job", "experiment=my"])
    train_main()
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.trainer.max_steps == 7 and cfg.trainer.log_every == 3 and cfg.model.vision.width == 48


def test_an_unknown_option_lists_the_users_options_too(user_conf, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mmpt-train", "model=clip/nope"])
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("error: model=clip/nope: no config 'clip/nope' in group 'model'; available: ")
    available = err.split("available: ", 1)[1].split(" (configs from", 1)[0].split(", ")
    assert "clip/mine" in available and "clip/tiny" in available and available == sorted(available)
    assert f"(configs from MMPT_CONF_DIR={user_conf} and {CONF_DIR})" in err


def test_a_missing_user_folder_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMPT_CONF_DIR", str(tmp_path / "nope"))
    monkeypatch.setattr(sys, "argv", ["mmpt-train", "trainer.dry_run=true"])
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err == (f"error: MMPT_CONF_DIR={tmp_path / 'nope'}: no such directory; create it with your config "
                   f"groups (e.g. {tmp_path / 'nope'}/experiment/my.yaml, {tmp_path / 'nope'}/data/mydata.yaml) "
                   "or unset MMPT_CONF_DIR")


def run_sweep(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_sweep_specs_are_found_by_name(monkeypatch, capsys):
    monkeypatch.delenv("MMPT_CONF_DIR", raising=False)
    by_path = run_sweep(capsys, "hydra", str(CONF_DIR / "sweep" / "albef_lr_grid.yaml"))
    by_name = run_sweep(capsys, "hydra", "albef_lr_grid")
    assert by_name == by_path and by_name[0] == 0 and by_name[1].startswith("mmpt-train -m experiment=albef_tiny")
    code, _, err = run_sweep(capsys, "hydra", "albef_lr_gird")
    assert code == 2 and "no such sweep spec: albef_lr_gird" in err and "albef_lr, albef_lr_grid, clip_tiny_lr" in err


def test_a_users_sweep_spec_by_name_checks_against_the_users_experiment(user_conf, capsys):
    code, out, err = run_sweep(capsys, "hydra", "my_sweep")
    assert code == 0, err
    assert out.strip() == ("mmpt-train -m experiment=my optimizer.lr=0.0003,0.001,0.003 "
                           "scheduler.warmup_steps=50,100")
    code, out, err = run_sweep(capsys, "check", "my_sweep")
    assert code == 0 and out.startswith("ok: my_sweep: method=grid"), err


def test_a_sweep_with_a_brace_pattern_in_its_command_checks_as_mmpt_train_runs_it(tmp_path, monkeypatch, capsys):
    """A W&B agent passes `data.train.urls=/d/{0..1}.tar` unquoted; mmpt-train quotes it, and so does check."""
    monkeypatch.delenv("MMPT_CONF_DIR", raising=False)
    spec = yaml.safe_load((CONF_DIR / "sweep" / "clip_tiny_lr.yaml").read_text())
    spec["command"] = ["${env}", "mmpt-train", "experiment=clip_tiny", "data.train.urls=/d/{00000..00009}.tar",
                       "${args_no_hyphens}"]
    path = tmp_path / "braces.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = run_sweep(capsys, "hydra", str(path), "data.eval.urls=/e/{0..1}.tar")
    assert code == 0, err
    assert out.strip() == ("mmpt-train -m experiment=clip_tiny 'data.train.urls=/d/{00000..00009}.tar' "
                           "'data.eval.urls=/e/{0..1}.tar' optimizer.lr=0.0003,0.001,0.003 "
                           "scheduler.warmup_steps=50,100")
    code, out, err = run_sweep(capsys, "check", str(path))
    assert code == 0 and out.startswith(f"ok: {path}"), err
