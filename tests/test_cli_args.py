"""`mmpt-train` argv: `key=value` and `--key=value` (what a W&B sweep agent passes with ${args}) both work;
Hydra's own flags and the deepspeed launcher's --local_rank are handled as before. A training run from
hyphenated argv, end to end: tests/test_train_e2e.py (the TFLOP/s and MFU run)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmpt.cli.common import normalize_override_args, strip_launcher_args

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("argv, expected", [
    (["trainer.max_steps=2"], ["trainer.max_steps=2"]),
    (["--trainer.max_steps=2"], ["trainer.max_steps=2"]),
    (["--trainer.max_steps", "2"], ["trainer.max_steps=2"]),
    (["--trainer.seed", "-1"], ["trainer.seed=-1"]),
    (["--optimizer.lr=1e-4,3e-4"], ["optimizer.lr=1e-4,3e-4"]),
    (["--+loss.weights.mlm=0.5", "--++loss.weights.itm=1"], ["+loss.weights.mlm=0.5", "++loss.weights.itm=1"]),
    (["--~logger.tags"], ["~logger.tags"]),
    (["--model=clip/tiny", "--hydra/launcher=local"], ["model=clip/tiny", "hydra/launcher=local"]),
    (["--hydra.run.dir=runs/x", "--data.train.urls='/d/{0..9}.tar'"],
     ["hydra.run.dir=runs/x", "data.train.urls='/d/{0..9}.tar'"]),
    (["--logger.tags=[a,b]", "--data.sources=[{name: a, urls: x}]"],
     ["logger.tags=[a,b]", "data.sources=[{name: a, urls: x}]"]),
    (["--logger.name="], ["logger.name="]),
    # an override key that argparse would take for an abbreviation of --experimental-rerun / --cfg / --run
    (["--experiment=clip_tiny", "--c=1", "--run.x=2"], ["experiment=clip_tiny", "c=1", "run.x=2"]),
])
def test_hyphenated_overrides_become_hydra_overrides(argv, expected):
    assert normalize_override_args(argv) == expected


@pytest.mark.parametrize("argv", [
    ["-m", "a=1,2"],
    ["--multirun", "a=1,2"],
    ["--config-name", "train", "--config-path", "conf", "--config-dir", "extra"],
    ["--config-name=train", "--cfg=job", "--package=trainer"],
    ["--cfg", "job", "--resolve", "-p", "trainer"],
    ["-c", "all", "--info", "defaults"],
    ["--info", "--help", "--hydra-help", "--version", "--run", "--shell-completion"],
    ["-cn", "train", "-cp", "conf", "-cd", "x", "-sc", "install=bash"],
    ["--experimental-rerun", "outputs/.hydra/config.pickle"],
    ["--", "a=1"],
    ["--bad flag", "--"],
])
def test_hydra_flags_and_their_values_stay(argv):
    assert normalize_override_args(argv) == argv


def test_a_bare_unknown_flag_is_left_for_hydra_to_reject():
    assert normalize_override_args(["--dry", "a=1"]) == ["--dry", "a=1"]
    assert normalize_override_args(["--dry"]) == ["--dry"]


def test_local_rank_is_still_stripped_and_the_rest_normalised():
    argv = ["mmpt-train", "--local_rank=1", "--trainer.max_steps=3", "--local_rank", "0", "-m", "--model=clip/tiny",
            "--local-rank=2"]
    assert strip_launcher_args(argv) == ["mmpt-train", "trainer.max_steps=3", "-m", "model=clip/tiny"]


# ---- brace patterns in values: what bash leaves of `key='/d/{00000..00331}.tar'` ------------------------------
@pytest.mark.parametrize("typed, normalised, value", [
    ("data.train.urls=/d/{00000..00331}.tar", "data.train.urls='/d/{00000..00331}.tar'", "/d/{00000..00331}.tar"),
    ("--data.eval.urls=/e/{0000..0003}.tar", "data.eval.urls='/e/{0000..0003}.tar'", "/e/{0000..0003}.tar"),
    ("data.train.urls=/d/{a,b}/x-{0..9}.tar", "data.train.urls='/d/{a,b}/x-{0..9}.tar'", "/d/{a,b}/x-{0..9}.tar"),
    ("x={0..9}", "x='{0..9}'", "{0..9}"),
    ("x=${oc.env:D}/{0..9}.tar", "x='${oc.env:D}/{0..9}.tar'", "${oc.env:D}/{0..9}.tar"),
    ("x=it's/{0..1}", "x=\"it's/{0..1}\"", "it's/{0..1}"),
    ("x=[/d/{0..9}.tar,/e/{0..1}.tar]", "x=['/d/{0..9}.tar','/e/{0..1}.tar']", ["/d/{0..9}.tar", "/e/{0..1}.tar"]),
    ("+x={k: /d/{0,1}.tar, j: [1,2]}", "+x={k: '/d/{0,1}.tar', j: [1,2]}", {"k": "/d/{0,1}.tar", "j": [1, 2]}),
    # what Hydra must still parse stays as it is
    ("data.train.urls='/d/{0..9}.tar'", "data.train.urls='/d/{0..9}.tar'", "/d/{0..9}.tar"),
    ("+x={a:1}", "+x={a:1}", {"a": 1}),
    ("x={}", "x={}", {}),
    ("x=[a,b]", "x=[a,b]", ["a", "b"]),
    ("x=${a.b}", "x=${a.b}", "${a.b}"),
])
def test_brace_patterns_in_values_are_quoted_for_hydra(typed, normalised, value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert normalize_override_args([typed]) == [normalised]
    assert OverridesParser.create().parse_override(normalised).value() == value


def test_only_braces_outside_interpolations_are_patterns():
    from mmpt.cli.brace_quoting import has_brace_pattern

    assert has_brace_pattern("${oc.env:D}/{0..9}.tar") and has_brace_pattern("/d/{a,b}.tar")
    assert not has_brace_pattern("${oc.decode:'{a,b}'}") and not has_brace_pattern("${x}/{a: 1}")
    assert not has_brace_pattern("/d/{single}.tar") and not has_brace_pattern("${a.b}")


@pytest.mark.parametrize("typed, normalised, values", [
    ("x=/d/{0..9}.tar,/e/{0..9}.tar", "x='/d/{0..9}.tar','/e/{0..9}.tar'", ["/d/{0..9}.tar", "/e/{0..9}.tar"]),
    ("x=a,b", "x=a,b", ["a", "b"]),
    ("x=choice(/d/{0..1}.tar,b)", "x=choice('/d/{0..1}.tar',b)", ["/d/{0..1}.tar", "b"]),
    ("optimizer.lr=1e-4,3e-4", "optimizer.lr=1e-4,3e-4", [1e-4, 3e-4]),
])
def test_a_multirun_sweep_keeps_its_values_each_quoted_on_its_own(typed, normalised, values):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert normalize_override_args(["-m", typed]) == ["-m", normalised]
    parser = OverridesParser.create()
    parsed = parser.parse_override(normalised)
    assert parsed.is_sweep_override()
    # each job of the sweep gets `x=<one value>` (Hydra's basic sweeper), parsed again
    jobs = [parser.parse_override(f"x={one}").value() for one in parsed.sweep_string_iterator()]
    assert jobs == values


@pytest.mark.slow  # a CLI subprocess
def test_a_brace_pattern_typed_without_quotes_reaches_the_data_pipeline(demo_env, tmp_path):
    """bash turns `data.train.urls='/d/{0..1}.tar'` into `data.train.urls=/d/{0..1}.tar`; the pattern is
    expanded by the pipeline (the error names the first missing shard), not refused by Hydra's grammar."""
    proc = subprocess.run([str(BIN / "mmpt-train"), "data.train.urls=/nope/{00000..00001}.tar",
                           f"hydra.run.dir={tmp_path}/run"], env=demo_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: data.train.urls" in proc.stderr and "/nope/00000.tar" in proc.stderr
    assert "mismatched input" not in proc.stderr and "Traceback" not in proc.stderr
