"""End to end through the real CLI: a single-process bf16 run on foreign shards, TFLOP/s and MFU lines (a run
whose argv is all `--key=value`, as a W&B agent passes it),
mmpt-eval's refusal of a missing checkpoint; the helpers other CLI tests share (torchrun, SIGKILL of a run
after a checkpoint). Killed-and-resumed 2-process runs: tests/test_exact_resume.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_helpers import kill_tree
import torch

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TINY = ["experiment=clip_tiny", "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=32",
        "trainer.log_every=5", "trainer.save_every=10", "trainer.keep_last=2", "scheduler.warmup_steps=5"]


def torchrun(run_dir: Path, overrides: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mmpt-train"),
            *TINY, *overrides, f"hydra.run.dir={run_dir}"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_after_checkpoint(cmd: list[str], env: dict, run_dir: Path, step: int, log: Path) -> None:
    """Start a run, SIGKILL its whole process group once checkpoint `step` is complete."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        marker = run_dir / "checkpoints" / f"step_{step:08d}" / "complete"
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, f"run ended before checkpoint {step}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; raise max_steps"
        kill_tree(proc.pid)  # like a node failure: every process at once
        proc.wait(timeout=30)
        time.sleep(0.5)


def write_foreign_shards(root: Path, image_bytes) -> str:
    """Shards as another img2dataset-style writer makes them: png/webp images, its own json (no image_id),
    non-numeric keys, a sample without caption in each shard."""
    import webdataset as wds

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    root.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(root / f"part-{shard}.tar")) as sink:
            for i, (name, rgb) in enumerate(list(colours.items()) * 3):
                sample = {"__key__": f"s{shard}_{i:03d}", "json": {"url": f"http://x/{i}.png", "status": "success"},
                          ("png" if i % 2 else "webp"): image_bytes(rgb, size=(40, 30), fmt="PNG" if i % 2 else "WEBP")}
                if i != 0:  # sample 0 of each shard has no caption
                    sample["txt"] = f"a plain {name} picture"
                sink.write(sample)
    return str(root / "part-{0..1}.tar")


def test_single_process_bf16_run_on_foreign_shards_without_tracker(demo_env, tmp_path, image_bytes):
    pattern = write_foreign_shards(tmp_path / "shards", image_bytes)
    tok = tmp_path / "tok.json"
    made = subprocess.run([str(BIN / "mmpt-data"), "tokenizer", "--shards", pattern, "--out", str(tok), "--vocab-size", "64"],
                          env=demo_env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "mmpt-train"), "model=clip/tiny", "data=webdataset", f"data.train.urls='{pattern}'",
           f"data.eval.urls='{pattern}'", f"tokenizer.path={tok}", "tokenizer.vocab_size=64", "data.image_size=32",
           "data.max_text_len=16", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
           "trainer.precision=bf16", "trainer.max_steps=6", "trainer.log_every=5", "logger=none",
           "deepspeed=zero0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=demo_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = metrics(run_dir)
    train = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in train] == [5, 6]
    assert all(0 < r["train/data_wait"] < 1 and r["train/samples_per_s"] > 0 for r in train)
    assert train[-1]["train/skipped"] >= 1  # the sample without caption was dropped and counted
    assert json.loads((run_dir / "summary.json").read_text())["retrieval/num_pairs"] == 22
    assert not (run_dir / "wandb").exists()
    assert "1 ranks (single)" in proc.stdout + proc.stderr
    assert "this CPU has AMX" not in proc.stdout + proc.stderr  # already bf16: no precision hint
    # no trainer.peak_tflops: achieved TFLOP/s is logged, MFU only where a known GPU gives the peak
    assert all(r["train/tflops"] > 0 for r in train)
    if not torch.cuda.is_available():
        assert not any("train/mfu" in r for r in recs)


def test_single_process_run_from_hyphenated_args_logs_tflops_and_mfu_against_the_configured_peak(demo_env, tmp_path):
    """Every override as --key=value (one as --key value): a W&B agent's `${args}` form trains end to end and is
    saved as plain Hydra overrides (the parsing itself: tests/test_cli_args.py). Every log line has TFLOP/s
    and MFU against trainer.peak_tflops."""
    from hydra import compose, initialize_config_dir

    from mmpt.cli.common import CONF_DIR
    from mmpt.engine.config import typed_config
    from mmpt.models.registry import build_model

    run_dir = tmp_path / "run"
    overrides = ["experiment=clip_tiny", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
                 "trainer.max_steps=20", "trainer.log_every=5", "trainer.save_every=20", "eval.at_end=false",
                 "logger=none", "deepspeed=zero0", "trainer.peak_tflops=1.0", "optimizer.lr=0.0003"]
    hyphenated = [f"--{o}" for o in overrides if o != "trainer.log_every=5"] + ["--trainer.log_every", "5"]
    proc = subprocess.run([str(BIN / "mmpt-train"), *hyphenated, f"--hydra.run.dir={run_dir}"], env=demo_env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 20
    saved = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.max_steps=20" in saved and "optimizer.lr=0.0003" in saved and "trainer.log_every=5" in saved
    assert "--" not in saved
    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == [5, 10, 15, 20] and all("train/loss" in r for r in recs)
    for r in recs:  # every log line: achieved TFLOP/s, and MFU against the configured peak of 1 TFLOP/s
        assert r["train/tflops"] > 0 and r["train/mfu"] == pytest.approx(r["train/tflops"] / 1.0, rel=1e-12)
    # the FLOPs behind it are the model's: TFLOP/s over samples/s is flops_per_sample (the interval cancels)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        model = build_model(typed_config(compose("train", overrides=overrides)).model)
    per_sample = model.flops_per_sample("pairs", batch_size=8)
    for r in recs:
        assert r["train/tflops"] * 1e12 / r["train/samples_per_s"] == pytest.approx(per_sample, rel=1e-6)
    assert re.search(r"step 20/20 \(100%\) \|.* TFLOP/s \| MFU \d+\.\d% \|", proc.stdout + proc.stderr)  # the console line
    # an fp32 run on a CPU with AMX says once that bf16 is faster there (mmpt/engine/precision_hint.py)
    from mmpt.engine.precision_hint import cpu_has_amx_bf16

    hinted = (proc.stdout + proc.stderr).count("this CPU has AMX: trainer.precision=bf16")
    assert hinted == (1 if cpu_has_amx_bf16() and not torch.cuda.is_available() else 0)


def test_mmpt_eval_rejects_missing_checkpoint(demo_env, tmp_path):
    ev = subprocess.run([str(BIN / "mmpt-eval"), f"ckpt={tmp_path}"], env=demo_env, capture_output=True, text=True)
    assert ev.returncode == 2 and "no complete checkpoint" in ev.stderr and "Traceback" not in ev.stderr
