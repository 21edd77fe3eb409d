"""DeepSpeed's JIT-built ops (the CPU comm op) are cached per venv: TORCH_EXTENSIONS_DIR defaults to
`<venv>/torch_extensions` at `import mmpt` when unset, and a value the user set is kept."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmpt.torch_extensions import default_torch_extensions_dir


def test_unset_in_a_venv_defaults_inside_the_venv(tmp_path):
    env: dict[str, str] = {}
    got = default_torch_extensions_dir(env, prefix=str(tmp_path / "venv"), base_prefix=str(tmp_path / "python"))
    assert got is None  # a venv folder that does not exist is not writable: torch's default stays
    (tmp_path / "venv").mkdir()
    got = default_torch_extensions_dir(env, prefix=str(tmp_path / "venv"), base_prefix=str(tmp_path / "python"))
    assert got == env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")


def test_a_value_the_user_set_is_kept(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": "/my/cache"}
    assert default_torch_extensions_dir(env, prefix=str(tmp_path), base_prefix="/usr") == "/my/cache"
    assert env == {"TORCH_EXTENSIONS_DIR": "/my/cache"}


def test_outside_a_venv_torchs_default_stays(tmp_path):
    env: dict[str, str] = {}
    assert default_torch_extensions_dir(env, prefix=str(tmp_path), base_prefix=str(tmp_path)) is None
    assert env == {}


def test_a_read_only_venv_keeps_torchs_default(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    venv.chmod(0o555)
    try:
        if os.access(venv, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert default_torch_extensions_dir({}, prefix=str(venv), base_prefix=str(tmp_path)) is None
    finally:
        venv.chmod(0o755)


CHILD = ("import os, mmpt; from torch.utils.cpp_extension import _get_build_directory; "
         "print(os.environ['TORCH_EXTENSIONS_DIR']); print(_get_build_directory('mmpt_probe', False))")


@pytest.mark.slow  # a subprocess
def test_import_mmpt_sets_it_and_torch_builds_there(tmp_path):
    """The running venv gets `<venv>/torch_extensions`; a user's value wins and torch builds under it."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a venv")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    probe = ("import os, mmpt, sys; print(os.environ['TORCH_EXTENSIONS_DIR'])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(Path(sys.prefix) / "torch_extensions")
    mine = tmp_path / "ext"
    out = subprocess.run([sys.executable, "-c", CHILD], env={**env, "TORCH_EXTENSIONS_DIR": str(mine)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(mine), str(mine / "mmpt_probe")] and (mine / "mmpt_probe").is_dir()
