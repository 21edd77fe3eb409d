"""The README's first command, reduced in size: fresh demo data, 2-process training, eval, report."""
from __future__ import annotations

import json
import re
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
    out = proc.stdout
    # progress lines: step, percentage, elapsed and ETA, then the configured keys (ALBEF: loss, itc, itm, mlm)
    assert re.search(r"step 8/12 \(67%\) \| elapsed \d+s \| eta \d+s \| loss [\d.]+ \| itc [\d.]+ \| itm [\d.]+ \| "
                     r"mlm [\d.]+ \| lr ", out), out[-3000:]
    training = out[out.index("[quickstart] training"):]  # (set-up may import DeepSpeed once itself)
    assert training.count("Setting accelerator to CPU") <= 1  # DeepSpeed's start-up chatter is not repeated per rank
    report = out[out.index("run finished: step 12/12"):]  # the human summary ends the run
    assert len(report.splitlines()) <= 16  # the summary (<= 15 lines) and the quickstart's last line
    result = json.loads((tmp_path / "run" / "summary.json").read_text())  # the trainer's final evaluation
    assert result["retrieval/num_pairs"] == 100 and result["samples_seen"] == 12 * 2 * 16
    # the default experiment is tiny ALBEF: its ITM re-ranking stage is evaluated and summarised too
    assert f"retrieval_itm  t2i_r1 {result['retrieval_itm/t2i_r1']:.3f}" in report
    assert f"mean {result['retrieval/mean']:.3f}" in report
    assert "checkpoints/step_00000012" in report and "wandb sync " in report and "mmpt-eval ckpt=" in report
    assert report.rstrip().endswith("summary.json")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:3] == [4, 8, 12]
