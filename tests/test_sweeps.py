"""Sweeps: the W&B sweep specs in mmpt/conf/sweep (`mmpt-sweep check|hydra|create`), Hydra multiruns on the
submitit launchers (local, and a real local SLURM) whose runs share a W&B group and carry their swept values,
and the submitit preemption signal reaching the trainer."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmpt.cli.common import CONF_DIR
from mmpt.cli.sweep import main as sweep_main
from mmpt.cli.sweep_spec import SpecError, format_value, hydra_command, load_spec
from mmpt.engine.config import LoggerConfig
from mmpt.engine.run_setup import add_submitit_preempt_signal
from mmpt.engine.sweep_info import SweepInfo, current_sweep_info, wandb_identity
from mmpt.tools.wandb_offline import find_offline_runs, read_offline_run

try:  # the session fixture that starts a real local SLURM (scripts/local_slurm.sh)
    from tests.slurm_cluster import slurm_cluster, tail  # noqa: F401
except ImportError:  # pragma: no cover - a checkout without it
    @pytest.fixture
    def slurm_cluster():
        pytest.skip("tests/slurm_cluster.py (the local SLURM fixture) is not available")

    def tail(path, chars: int = 6000) -> str:
        return ""

BIN = Path(sys.executable).parent
SPECS = sorted((CONF_DIR / "sweep").glob("*.yaml"))
# a tiny CLIP run: 2 steps, single process, no eval, W&B offline (the env of demo_env)
TINY = ["experiment=clip_tiny", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
        "trainer.max_steps=2", "trainer.log_every=1", "deepspeed=zero0", "eval.at_end=false", "logger=wandb",
        "logger.group=null"]


def write_spec(path: Path, parameters: dict, fixed: tuple[str, ...] | list[str] = ("experiment=clip_tiny",),
               method: str = "grid") -> Path:
    spec = {"method": method, "metric": {"name": "eval/retrieval/mean", "goal": "maximize"},
            "parameters": parameters, "command": ["${env}", "mmpt-train", *fixed, "${args_no_hyphens}"]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ---- specs ---------------------------------------------------------------------------------------------------
def test_there_are_specs_for_albef_and_the_tiny_demo():
    assert {"albef_lr.yaml", "clip_tiny_lr.yaml"} <= {p.name for p in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_in_conf_sweep_passes_check(spec, capsys):
    code, out, err = run_cli(capsys, "check", str(spec))
    assert code == 0, err
    assert out.startswith(f"ok: {spec}") and "configs checked" in out


@pytest.mark.parametrize("key, fixed, named", [
    ("optimizer.lrr", ["experiment=clip_tiny"], "optimizer.lrr"),  # a swept key that does not exist
    ("optimizer.lr", ["experiment=clip_tiny", "trainer.max_stepz=5"], "trainer.max_stepz"),  # a fixed override
    ("optimizer.lr", ["experiment=clip_tinyy"], "experiment/clip_tinyy"),  # a config group option
    ("+loss.weights.itmm", ["experiment=clip_tiny"], "itmm"),  # composes, but CLIP has no such objective
])
def test_a_typo_fails_check_naming_the_key(tmp_path, capsys, key, fixed, named):
    spec = write_spec(tmp_path / "bad.yaml", {key: {"values": [0.001, 0.003]}}, fixed)
    code, out, err = run_cli(capsys, "check", str(spec))
    assert code == 2 and out == ""
    assert err.startswith(f"error: {spec}: ") and named in err and err.count("\n") == 1, err


def test_a_wrong_value_type_fails_check_naming_the_parameter(tmp_path, capsys):
    spec = write_spec(tmp_path / "bad.yaml", {"scheduler.warmup_steps": {"values": [10, "ten"]}})
    code, _, err = run_cli(capsys, "check", str(spec))
    assert code == 2 and "parameter 'scheduler.warmup_steps' = ten" in err and "scheduler.warmup_steps" in err


@pytest.mark.parametrize("change, message", [
    ({"method": "grdi"}, "method='grdi': choose one of grid, random, bayes"),
    ({"metric": None}, "metric is required"),
    ({"metric": {"name": "loss", "goal": "minimize"}}, "metric.name='loss' is not a key mmpt logs"),
    ({"metric": {"name": "train/loss", "goal": "lowest"}}, "metric.goal='lowest'"),
    ({"command": ["python", "train.py", "${args}"]}, "command must run mmpt-train"),
    ({"command": ["${env}", "mmpt-train", "experiment=clip_tiny"]}, "command needs exactly one of"),
    ({"command": ["${env}", "mmpt-train", "-m", "${args}"]}, "'-m' is not a Hydra override"),
    ({"parameters": {"optimizer.lr": {"distribution": "uniform", "min": 0.1, "max": 0.2}}}, "method=grid needs values"),
    ({"parameters": {"optimizer.lr": {"valuez": [1]}}}, "unknown field 'valuez'"),
])
def test_spec_structure_errors(tmp_path, change, message):
    path = write_spec(tmp_path / "s.yaml", {"optimizer.lr": {"values": [0.001]}})
    body = yaml.safe_load(path.read_text())
    body.update(change)
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(SpecError, match=None) as exc_info:
        load_spec(path)
    assert message in str(exc_info.value)


# ---- the offline flow: a spec as a Hydra multirun ------------------------------------------------------------
def test_hydra_command_of_a_small_grid_is_exact(tmp_path, capsys):
    spec = write_spec(tmp_path / "grid.yaml", {
        "optimizer.lr": {"values": [0.0003, 0.001]},
        "scheduler.warmup_steps": {"values": [10, 100]},
        "++loss.weights.itc": {"value": 1.0},
        "logger.tags": {"values": [["a", "b"], ["c"]]},
        "logger.name": {"values": ["x y", "plain"]},
    }, fixed=["experiment=clip_tiny", "trainer.max_steps=500"])
    code, out, err = run_cli(capsys, "hydra", str(spec), "trainer.max_steps=50", "hydra/launcher=local")
    assert code == 0, err
    assert out == ("mmpt-train -m experiment=clip_tiny trainer.max_steps=50 hydra/launcher=local "
                   "optimizer.lr=0.0003,0.001 scheduler.warmup_steps=10,100 ++loss.weights.itc=1.0 "
                   "'logger.tags=[a,b],[c]' 'logger.name='\"'\"'x y'\"'\"',plain'\n")
    # what Hydra's basic sweeper makes of it: 2 x 2 x 1 x 2 x 2 jobs with exactly the listed values
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    jobs = [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(shlex.split(out)[2:]), None)
            for job in batch]
    values = [{o.key_or_group: o.value() for o in parser.parse_overrides(job)} for job in jobs]
    assert len(values) == 16 and all(v["trainer.max_steps"] == 50 and v["loss.weights.itc"] == 1.0 for v in values)
    assert {(v["optimizer.lr"], v["scheduler.warmup_steps"], tuple(v["logger.tags"]), v["logger.name"])
            for v in values} == {(lr, w, tags, name) for lr in (0.0003, 0.001) for w in (10, 100)
                                 for tags in (("a", "b"), ("c",)) for name in ("x y", "plain")}


def test_hydra_refuses_what_a_grid_cannot_express(capsys):
    code, out, err = run_cli(capsys, "hydra", str(CONF_DIR / "sweep" / "albef_lr.yaml"))
    assert code == 2 and out == ""
    assert "parameter 'optimizer.lr' samples log_uniform_values" in err and "values: [...]" in err


def test_hydra_refuses_an_override_of_a_swept_key(tmp_path, capsys):
    spec = write_spec(tmp_path / "g.yaml", {"optimizer.lr": {"values": [0.1, 0.2]}})
    code, _, err = run_cli(capsys, "hydra", str(spec), "optimizer.lr=1")
    assert code == 2 and "optimizer.lr is a parameter of the sweep" in err


def test_format_value_round_trips_through_hydras_grammar():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in [0.0003, 3e-05, 1e-4, 7, -2, True, None, "clip/tiny", "a b", "it's", "x,y", [0.9, 0.98], {"a": 1}]:
        assert parser.parse_override(f"k={format_value(value)}").value() == value, value
    command = hydra_command(load_spec(CONF_DIR / "sweep" / "clip_tiny_lr.yaml"))
    assert command[:3] == ["mmpt-train", "-m", "experiment=clip_tiny"]


# ---- W&B server flows without a server ------------------------------------------------------------------------
@pytest.mark.slow  # CLI subprocesses
def test_create_and_agent_without_a_server_exit_2_with_the_offline_alternative(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_SILENT="true")
    spec = str(CONF_DIR / "sweep" / "clip_tiny_lr.yaml")
    cases = [({"WANDB_MODE": "offline"}, ["create", spec], "WANDB_MODE=offline"),
             ({}, ["create", spec], "no API key is configured"),
             ({}, ["agent", "abc123", "--count", "1"], "no API key is configured")]
    for extra, argv, reason in cases:
        proc = subprocess.run([str(BIN / "mmpt-sweep"), *argv], env={**env, **extra}, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], proc.stderr
        assert "mmpt-sweep hydra" in lines[0] and "--run" in lines[0] and "wandb sync" in lines[0]
        assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---- W&B identity and submitit signal (units) -------------------------------------------------------------------
def test_outside_a_sweep_the_logger_config_decides():
    cfg = LoggerConfig(group="g", name="n", tags=["t"])
    ident = wandb_identity(cfg, SweepInfo(overrides=["trainer.max_steps=3"]))
    assert (ident.group, ident.name, ident.tags) == ("g", "n", ["t"])
    assert ident.config == {"overrides": ["trainer.max_steps=3"]}
    assert current_sweep_info({}).kind == ""  # no Hydra context, no W&B agent


def test_in_a_sweep_runs_share_a_group_and_name_their_swept_values():
    info = SweepInfo("hydra", "2026-01-01_10-00-00", "multirun/2026-01-01_10-00-00", 3,
                     ["experiment=clip_tiny", "optimizer.lr=0.0003"], ["optimizer.lr=0.0003"])
    ident = wandb_identity(LoggerConfig(), info)
    assert ident.group == "sweep-2026-01-01_10-00-00" and ident.name == "job3 optimizer.lr=0.0003"
    assert ident.tags == ["sweep-2026-01-01_10-00-00"]
    assert ident.config["overrides"] == ["experiment=clip_tiny", "optimizer.lr=0.0003"]
    assert ident.config["sweep"]["swept"] == ["optimizer.lr=0.0003"] and ident.config["sweep"]["job_num"] == 3
    assert wandb_identity(LoggerConfig(group="mine", name="lr"), info).group == "mine"
    assert wandb_identity(LoggerConfig(group="mine", name="lr"), info).name == "lr optimizer.lr=0.0003"


def test_under_a_wandb_agent_the_sweep_id_names_the_group(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("optimizer.lr:\n  value: 0.001\n")
    info = current_sweep_info({"WANDB_SWEEP_ID": "abc123", "WANDB_SWEEP_PARAM_PATH": str(params)})
    assert (info.kind, info.sweep_id) == ("wandb", "abc123")
    assert wandb_identity(LoggerConfig(), info).group == "sweep-abc123"


def test_submitit_jobs_also_checkpoint_on_submitits_signal():
    def cfg(signals):
        return SimpleNamespace(trainer=SimpleNamespace(preempt_signals=list(signals)))

    c = cfg(["USR1", "TERM"])
    add_submitit_preempt_signal(c, {})  # not a submitit job: unchanged
    assert c.trainer.preempt_signals == ["USR1", "TERM"]
    add_submitit_preempt_signal(c, {"SUBMITIT_EXECUTOR": "slurm"})
    assert c.trainer.preempt_signals == ["USR1", "TERM", "USR2"]
    add_submitit_preempt_signal(c, {"SUBMITIT_EXECUTOR": "slurm"})  # once
    assert c.trainer.preempt_signals == ["USR1", "TERM", "USR2"]
    c = cfg(["SIGUSR2"])
    add_submitit_preempt_signal(c, {"SUBMITIT_EXECUTOR": "local"})
    assert c.trainer.preempt_signals == ["SIGUSR2"]
    c = cfg(["USR1"])
    add_submitit_preempt_signal(c, {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_PREEMPT_SIGNAL": "USR1"})
    assert c.trainer.preempt_signals == ["USR1"]
    c = cfg([])  # handling switched off by the user: left off
    add_submitit_preempt_signal(c, {"SUBMITIT_EXECUTOR": "slurm"})
    assert c.trainer.preempt_signals == []


# ---- real multiruns -----------------------------------------------------------------------------------------
def check_sweep_runs(sweep_dir: Path, lrs: list[float]) -> None:
    """Both jobs finished, their W&B offline runs share the sweep's group and carry their own lr."""
    runs = {}
    for num in range(len(lrs)):
        files = find_offline_runs(sweep_dir / str(num))
        assert len(files) == 1, (num, files)
        runs[num] = read_offline_run(files[0])
    assert all(r.finished for r in runs.values())
    assert {r.group for r in runs.values()} == {f"sweep-{sweep_dir.name}"}
    assert len({r.run_id for r in runs.values()}) == len(lrs)
    for num, lr in enumerate(lrs):
        run = runs[num]
        assert run.config["optimizer"]["lr"] == pytest.approx(lr)
        assert f"optimizer.lr={lr}" in run.config["overrides"] and "experiment=clip_tiny" in run.config["overrides"]
        assert run.config["sweep"]["swept"] == [f"optimizer.lr={lr}"] and run.config["sweep"]["job_num"] == num
        assert run.name == f"job{num} optimizer.lr={lr}"
        assert [row["_step"] for row in run.history if "train/loss" in row] == [1, 2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_spec_runs_offline_as_a_submitit_local_multirun(demo_env, tmp_path):
    """`mmpt-sweep hydra SPEC --run` = `mmpt-train -m hydra/launcher=local ...`: 2 jobs, W&B offline."""
    lrs = [0.0001, 0.0003]
    spec = write_spec(tmp_path / "lr.yaml", {"optimizer.lr": {"values": lrs}}, TINY)
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([str(BIN / "mmpt-sweep"), "hydra", str(spec), "hydra/launcher=local",
                           f"hydra.sweep.dir={sweep_dir}", "--run"], env=demo_env, capture_output=True, text=True,
                          timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout.splitlines()[0]
    assert printed == shlex.join(["mmpt-train", "-m", *TINY, "hydra/launcher=local", f"hydra.sweep.dir={sweep_dir}",
                                  "optimizer.lr=0.0001,0.0003"])
    assert (sweep_dir / ".submitit").is_dir()  # submitit ran the jobs
    check_sweep_runs(sweep_dir, lrs)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multirun_on_slurm_is_a_job_array(slurm_cluster, demo_env, tmp_path):
    """`mmpt-train -m hydra/launcher=slurm` over 2 values on the local SLURM cluster: one array, both finish."""
    cluster = slurm_cluster
    lrs = [0.0001, 0.0003]
    sweep_dir = tmp_path / "sweep"
    cmd = [str(BIN / "mmpt-train"), "-m", "hydra/launcher=slurm", *TINY, "optimizer.lr=1e-4,3e-4",
           f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.timeout_min=20",
           f"hydra.launcher.partition={cluster.partition}"]
    env = {k: v for k, v in cluster.env(demo_env).items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    logs = "".join(p.read_text(errors="replace")[-2000:] for p in sorted(sweep_dir.glob(".submitit/*/*_log.*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    scripts = list(sweep_dir.glob(".submitit/*/*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1" in scripts[0].read_text()  # one array of 2 tasks
    assert "#SBATCH --signal=USR2@120" in scripts[0].read_text()  # submitit's requeue signal (the trainer adds it)
    check_sweep_runs(sweep_dir, lrs)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submitit_requeues_a_preempted_job_which_resumes(slurm_cluster, demo_env, tmp_path):
    """SLURM sends submitit's USR2 (as before a time limit): the trainer checkpoints the step, submitit requeues
    the same job, which resumes in the same run dir with the same W&B run and finishes max_steps."""
    cluster, max_steps = slurm_cluster, 60
    sweep_dir = tmp_path / "sweep"
    cmd = [str(BIN / "mmpt-train"), "-m", "hydra/launcher=slurm", *TINY, f"trainer.max_steps={max_steps}",
           "trainer.log_every=5", "trainer.save_every=1000", "optimizer.lr=1e-4", f"hydra.sweep.dir={sweep_dir}",
           "hydra.launcher.timeout_min=20", f"hydra.launcher.partition={cluster.partition}"]
    env = {k: v for k, v in cluster.env(demo_env).items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, job, log = time.monotonic() + 600, None, None
        while time.monotonic() < deadline:  # the job is training: step 10 logged
            logs = list(sweep_dir.glob(".submitit/*/*_0_log.out"))
            if logs and "step 10/" in logs[0].read_text(errors="replace"):
                log, job = logs[0], logs[0].parent.name
                break
            assert driver.poll() is None, driver.communicate()[0][-3000:]
            time.sleep(0.2)
        assert job, "the job did not reach step 10 in time"
        cluster.run("scancel", "--signal=USR2", job)
        released = False
        while time.monotonic() < deadline and not released:  # requeued: held ~2 min (BeginTime); release it
            if cluster.state(job) == "PENDING":
                cluster.release_requeued(job)
                released = True
            assert driver.poll() is None or released, driver.communicate()[0][-3000:]
            time.sleep(0.5)
        out, _ = driver.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if driver.poll() is None:
            driver.kill()
    assert released and driver.returncode == 0, out[-3000:] + tail(log)
    run_dir = sweep_dir / "0"
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["signal"] == "SIGUSR2" and 10 <= marker["step"] < max_steps
    text = log.read_text(errors="replace")
    assert "Requeued job" in text and f"resumed from {run_dir}/checkpoints/step_{marker['step']:08d}" in text, tail(log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == max_steps
    runs = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert len(runs) == 2 and {r.run_id for r in runs} == {summary["wandb_run_id"]} and runs[-1].finished
