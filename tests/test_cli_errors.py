"""`mmpt-train`: Hydra's override and composition errors end as ONE `error:` line with the fix and exit 2
(unknown key, grammar, unknown config group option, a launcher whose extra is not installed). The fast tier runs
`mmpt.cli.train.main` in-process (Hydra composes, the error comes before any task); the subprocess runs are slow."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmpt.cli.common import CONF_DIR
from mmpt.cli.hydra_errors import explain
from mmpt.cli.train import main as train_main

BIN = Path(sys.executable).parent


def run_main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mmpt-train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def shipped_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


# The one-line form of each override error (unknown key, +, grammar, group option): tests/test_config_refusals.py


def test_an_unknown_model_lists_every_model_config(monkeypatch, capsys):
    monkeypatch.delenv("MMPT_CONF_DIR", raising=False)
    code, _, err = run_main(monkeypatch, capsys, "model=clip/huge")
    line = one_error_line(err)
    listed = line.split("available: ", 1)[1].split(" (configs from", 1)[0].split(", ")
    assert code == 2 and line.startswith("error: model=clip/huge: no config 'clip/huge' in group 'model'; ")
    assert listed == shipped_options("model") and "clip/tiny" in listed and "albef/base" in listed


def test_a_bad_option_inside_a_multirun_sweep_is_explained_too(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MMPT_CONF_DIR", raising=False)
    code, _, err = run_main(monkeypatch, capsys, "-m", "deepspeed=zero0,zero9", "trainer.dry_run=true",
                            f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2 and one_error_line(err).startswith("error: deepspeed=zero0,zero9: no config 'zero9' in group")


@pytest.mark.slow  # Hydra's --help composes every config group (~6 s here)
def test_help_starts_with_mmpts_usage_then_hydras_config_groups(monkeypatch, capsys):
    monkeypatch.delenv("MMPT_CONF_DIR", raising=False)
    code, out, _ = run_main(monkeypatch, capsys, "--help")
    assert code == 0 and out.startswith("mmpt-train: image-text pretraining")
    examples = [line.strip() for line in out[out.index("examples:"):out.index("configs:")].splitlines()[1:]]
    assert sum(line.startswith(("mmpt-train", "torchrun")) for line in examples) == 5
    assert f"live in {CONF_DIR}" in out and "--cfg job --resolve" in out
    groups = out[out.index("== Config groups"):]
    assert "experiment: albef_4m, albef_tiny" in groups and "deepspeed: zero0, zero1, zero2, zero3" in groups
    assert "== Config ==" not in out and len(out.splitlines()) < 60  # not the 140-line default config


def test_cfg_keeps_hydras_output(monkeypatch, capsys):
    monkeypatch.delenv("MMPT_CONF_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", ["mmpt-train", "--cfg", "job", "data.train.urls=/d/{00000..00331}.tar"])
    with pytest.raises(SystemExit) as exit_info:  # Hydra's --cfg returns normally from a real console script
        train_main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    assert OmegaConf.create(out).data.train.urls == "/d/{00000..00331}.tar"


def test_a_missing_config_dir_flag_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "--config-dir", str(tmp_path / "nope"), "trainer.dry_run=true")
    assert code == 2 and one_error_line(err) == (
        f"error: Additional config directory '{tmp_path / 'nope'}' not found; "
        "--config-dir takes an existing folder of config groups")


def test_missing_mandatory_value_is_explained():
    with pytest.raises(Exception) as info:
        _ = OmegaConf.create({"data": {"urls": "???"}}).data.urls
    assert explain(info.value, []) == ("config key 'data.urls' is required but not set (???). "
                                       "Set it on the command line: data.urls=...")


def test_errors_it_does_not_know_are_left_to_hydra():
    assert explain(ValueError("x"), []) is None
    from hydra.errors import ConfigCompositionException

    assert explain(ConfigCompositionException("something new"), []) is None


# ---- subprocesses: the console script, and a venv without the [slurm] extra --------------------------------
@pytest.mark.slow  # a CLI subprocess
def test_console_script_unknown_key_exits_2_with_one_line(demo_env, tmp_path):
    proc = subprocess.run([str(BIN / "mmpt-train"), "trainer.max_stpes=5", f"hydra.run.dir={tmp_path}/run"],
                          env=demo_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_error_line(proc.stderr).startswith("error: unknown config key 'trainer.max_stpes'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a CLI subprocess
def test_a_missing_mandatory_value_is_one_line_naming_the_key(demo_env, tmp_path):
    proc = subprocess.run([str(BIN / "mmpt-train"), "data=webdataset", "trainer.dry_run=true",
                           f"hydra.run.dir={tmp_path}/run"], env=demo_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == ("error: config key 'data.train.urls' is required but not set (???). "
                                           "Set it on the command line: data.train.urls=...")


# Hydra finds launcher plugins by walking the `hydra_plugins` namespace package: an empty one hides the
# installed hydra-submitit-launcher, as in a venv without the [slurm] extra.
WITHOUT_SUBMITIT = """
import sys, types
stub = types.ModuleType("hydra_plugins"); stub.__path__ = []; sys.modules["hydra_plugins"] = stub
sys.argv = ["mmpt-train", *sys.argv[1:]]
from mmpt.cli.train import main
main()
"""


@pytest.mark.slow  # a CLI subprocess
@pytest.mark.parametrize("argv", [["-m", "hydra/launcher=slurm"], ["hydra/launcher=local"]])
def test_a_launcher_without_its_extra_names_the_extra(demo_env, tmp_path, argv):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_SUBMITIT, *argv, "trainer.dry_run=true",
                           f"hydra.sweep.dir={tmp_path}/sweep", f"hydra.run.dir={tmp_path}/run"],
                          env=demo_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    launcher = argv[-1].split("=")[1]
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == (f"error: hydra/launcher={launcher} needs the [slurm] extra: "
                                           "pip install 'mmpt[slurm]' (Hydra's submitit launcher plugin is not "
                                           "installed)")
