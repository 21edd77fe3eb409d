"""The README's first command, reduced in size: fresh demo data, 2-process training, eval, report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reduced_quickstart_through_the_real_cli(tmp_path):
    env = {**os.environ, "MMPT_VENV": str(Path(sys.executable).parents[1]), "MMPT_DEMO_DIR": str(tmp_path / "demo"),
           "MMPT_RUN_DIR": str(tmp_path / "run"), "MMPT_TRAIN_SAMPLES": "400", "MMPT_EVAL_SAMPLES": "100",
           "WANDB_MODE": "offline"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), "trainer.max_steps=12", "trainer.log_every=4",
                           "data.batch_size=16", "data.eval_batch_size=50"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "demo" / "train" / "sizes.json").read_text()) == {f"{i:05d}.tar": 20 for i in range(20)}
    report = proc.stdout[proc.stdout.index("== mmpt quickstart =="):]
    result = json.loads((tmp_path / "run" / "summary.json").read_text())  # the trainer's final evaluation
    assert result["retrieval/num_pairs"] == 100
    assert f"caption-identity {result['retrieval/t2i_r1_caption']:.3f}" in report
    # the default experiment is tiny ALBEF: its ITM re-ranking stage is evaluated and reported too
    assert "retrieval_itm: ITC top-k re-ranked by ITM" in report
    assert f"caption-identity {result['retrieval_itm/t2i_r1_caption']:.3f}" in report
    assert "checkpoints/step_00000012" in report and "offline-run-" in report
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:3] == [4, 8, 12]
