"""Console/jsonl/W&B fan-out: records land in metrics.jsonl and the offline W&B run, tables included."""
from __future__ import annotations

import json

import numpy as np

from mmpt.engine.config import LoggerConfig
from mmpt.engine.loggers import RunLogger
from mmpt.engine.progress import ProgressClock, default_console_keys, format_duration, format_progress
from mmpt.tools.wandb_offline import find_offline_runs, read_offline_run
from mmpt.eval.runner import CaptionSample


def test_progress_line_shows_step_percent_elapsed_eta_and_only_the_console_keys():
    record = {"step": 300, "train/loss": 1.5, "train/itc": 1.25, "train/grad_norm": 3.0, "train/lr": 1e-3,
              "train/samples_per_s": 512.0, "train/data_wait": 0.04, "train/skipped": 2, "train/tflops": 0.5}
    keys = default_console_keys(["itc"])
    line = format_progress(record, 2000, keys, elapsed=130.0, eta=760.0)
    assert line == ("step 300/2000 (15%) | elapsed 2m10s | eta 12m40s | loss 1.5000 | itc 1.2500 | lr 1.00e-03 | "
                    "512.0 samples/s | 0.5 TFLOP/s | data-wait 4% | skipped 2")  # grad_norm: metrics.jsonl only
    assert format_progress(record, 2000, ["loss", "grad_norm"]) == "step 300/2000 (15%) | loss 1.5000 | grad_norm 3.0000"
    assert "skipped" not in format_progress({**record, "train/skipped": 0}, 2000, keys)  # zero skips hide
    assert "MFU 1.2%" in format_progress({**record, "train/mfu": 0.0123}, 2000, keys)
    assert format_duration(3725) == "1h02m" and format_duration(59.6) == "1m00s" and format_duration(7) == "7s"


def test_eta_follows_a_moving_average_of_seconds_per_step():
    clock = ProgressClock(start_step=100, smoothing=0.5, now=0.0)  # a resumed run: 100 steps already done
    assert clock.update(110, now=10.0) == (10.0, 1.0) and clock.eta(110, 1000) == 890.0
    elapsed, per_step = clock.update(120, now=40.0)  # 3 s/step now: the average moves half way
    assert (elapsed, per_step, clock.eta(120, 1000)) == (40.0, 2.0, 1760.0)
    assert clock.update(120, now=50.0)[1] == 2.0  # an eval record at the same step does not move the average


def test_records_and_caption_table_reach_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(LoggerConfig(backend="wandb", mode="offline", project="p", group="g"), tmp_path, "abc123",
                       {"trainer": {"max_steps": 4}}, is_main=True, max_steps=4)
    logger.log({"step": 2, "train/loss": 3.0, "train/itc": 3.0})
    logger.log({"step": 4, "eval/caption/bleu4": 0.5})
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    logger.log_caption_samples(4, [CaptionSample(image, "a red circle", "a red square")])
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 2, "train/loss": 3.0, "train/itc": 3.0}, {"step": 4, "eval/caption/bleu4": 0.5}]
    run = read_offline_run(find_offline_runs(tmp_path)[0])
    assert run.run_id == "abc123" and run.group == "g" and run.config["trainer"]["max_steps"] == 4
    rows = {row["_step"]: row for row in run.history}
    assert rows[2]["train/itc"] == 3.0 and rows[4]["eval/caption/bleu4"] == 0.5
    assert rows[4]["eval/caption_samples"]["_type"] == "table-file"
    table = next(tmp_path.rglob("caption_samples_*.table.json"))
    data = json.loads(table.read_text())
    assert data["columns"] == ["image", "generated", "reference"] and data["data"][0][1:] == ["a red circle", "a red square"]
