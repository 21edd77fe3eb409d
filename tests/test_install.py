"""An install that works outside the checkout: build a wheel, install it (no deps) into a fresh venv, and run the
installed console scripts from another directory. The fresh venv borrows the running venv's dependencies
through a plain path line in a .pth file (no network, no reinstall); a plain path line does not run the
editable finder of the dev install, so `mmpt` itself can only come from the wheel (checked)."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
# The dev extra's packages: the fresh venv must work without them, as a plain `pip install mmpt` would.
DEV_ONLY = ("transformers", "pycocoevalcap", "pytest")
BLOCKER = f"""import sys
from importlib.abc import MetaPathFinder

class _DevOnly(MetaPathFinder):
    \"\"\"Installed in the borrowed site-packages, but not part of a plain install of mmpt.\"\"\"
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {DEV_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (dev extra, blocked in this test venv)")
        return None

sys.meta_path.insert(0, _DevOnly())
"""
pytestmark = pytest.mark.slow  # builds a wheel and a venv, runs console scripts (~30 s on 2 cores)


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh venv with the wheel of this checkout installed; returns its bin/ and site-packages paths."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the dependencies are borrowed from the running venv; run the tests from a venv")
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"  # never the network
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # build from a copy, so the checkout gets no build/ or *.egg-info
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mmpt", src / "mmpt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp / "dist"],
        env, tmp)
    (wheel,) = (tmp / "dist").glob("mmpt-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], env, tmp)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], env, tmp)
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp)
                   .stdout.strip())
    (purelib / "_mmpt_test_deps.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    (purelib / "_mmpt_test_block_dev.py").write_text(BLOCKER)
    (purelib / "_mmpt_test_block_dev.pth").write_text("import _mmpt_test_block_dev\n")
    return {"bin": venv / "bin", "venv": venv, "purelib": purelib, "env_base": tmp}


@pytest.fixture
def clean_env(demo_env: dict[str, str]) -> dict[str, str]:
    """The demo data, but nothing that points back into the checkout."""
    return {k: v for k, v in demo_env.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MMPT_CONF_DIR", "TORCH_EXTENSIONS_DIR")}


def test_mmpt_comes_from_the_wheel_with_its_configs(installed, clean_env, tmp_path):
    probe = ("import json, os, mmpt, mmpt.cli.common as c; print(json.dumps({'mmpt': mmpt.__file__, "
             "'conf': str(c.CONF_DIR), 'ext': os.environ.get('TORCH_EXTENSIONS_DIR')}))")
    got = json.loads(run([installed["bin"] / "python", "-c", probe], clean_env, tmp_path).stdout)
    package = installed["purelib"] / "mmpt"
    assert Path(got["mmpt"]) == package / "__init__.py"
    assert Path(got["conf"]) == package / "conf" and (package / "conf" / "model" / "clip" / "tiny.yaml").is_file()
    assert got["ext"] == str(installed["venv"] / "torch_extensions")  # DeepSpeed's ops cached in this venv
    # every module of the package imports on a plain install (no dev extra)
    walk = ("import importlib, pkgutil, mmpt; names = [m.name for m in pkgutil.walk_packages(mmpt.__path__, 'mmpt.')]; "
            "[importlib.import_module(n) for n in names]; print(len(names))")
    assert int(run([installed["bin"] / "python", "-c", walk], clean_env, tmp_path).stdout) > 50
    blocked = subprocess.run([installed["bin"] / "python", "-c", "import transformers"], env=clean_env,
                             capture_output=True, text=True, timeout=60)
    assert blocked.returncode == 1 and "dev extra, blocked in this test venv" in blocked.stderr


def test_installed_mmpt_train_dry_run_works_from_another_directory(installed, clean_env, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run([installed["bin"] / "mmpt-train", "model=clip/tiny", "trainer.dry_run=true",
                "hydra.run.dir=run"], clean_env, elsewhere)
    assert proc.stdout.startswith("dry run: clip -- nothing is trained"), proc.stdout
    report = json.loads(proc.stdout.split("dry_run: ", 1)[1].splitlines()[0])
    # the same parameter count as the checkout's own composition of model=clip/tiny
    from mmpt.cli.common import CONF_DIR
    from mmpt.engine.dist_env import DistEnv
    from mmpt.engine.run_setup import validate

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        expected = validate(compose("train", overrides=["model=clip/tiny"]), DistEnv(0, 0, 1, "127.0.0.1", 29500,
                                                                                   "single"))
    assert (report["model"], report["ranks"], report["params_trainable"]) == ("clip", 1, expected.trainable_params)
    # Hydra composed from the installed package's configs, and wrote its run dir under the working directory
    hydra_cfg = yaml.safe_load((elsewhere / "run" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {s["provider"]: s["path"] for s in hydra_cfg["runtime"]["config_sources"]}
    assert sources["main"] == str(installed["purelib"] / "mmpt" / "conf")
    assert not (elsewhere / "run" / "checkpoints").exists()


def test_installed_commands_answer_from_another_directory(installed, clean_env, tmp_path):
    data_help = run([installed["bin"] / "mmpt-data", "--help"], clean_env, tmp_path).stdout
    assert data_help.startswith("usage: mmpt-data") and "visual-tokenizer" in data_help
    sweep = run([installed["bin"] / "mmpt-sweep", "hydra", "albef_lr_grid"], clean_env, tmp_path).stdout
    assert sweep.startswith("mmpt-train -m experiment=albef_tiny")  # a shipped spec, found by name
    proc = subprocess.run([installed["bin"] / "mmpt-eval"], env=clean_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: missing ckpt=")
    export_help = run([installed["bin"] / "mmpt-export", "--help"], clean_env, tmp_path).stdout
    assert export_help.startswith("usage: mmpt-export") and "--format" in export_help


def test_installed_visual_tokenizer_writes_safetensors_without_the_dev_extra(installed, clean_env, demo_dir,
                                                                             tmp_path):
    """`mmpt-data visual-tokenizer` (scripts/vlmo_stagewise.sh's first step) on a plain install."""
    out = tmp_path / "vt.safetensors"
    run([installed["bin"] / "mmpt-data", "visual-tokenizer", "--shards", f"{demo_dir}/train/{{00000..00001}}.tar",
         "--codebook-size", "8", "--out", out, "--patch-size", "8", "--image-size", "32", "--max-images", "16",
         "--iters", "2"], clean_env, tmp_path)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert (8, 8 * 8 * 3) in shapes.values(), shapes  # K codes of 8x8 RGB patches
