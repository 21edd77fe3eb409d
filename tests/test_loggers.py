"""Console/jsonl/W&B fan-out: records land in metrics.jsonl and the offline W&B run, tables included."""
from __future__ import annotations

import json

import numpy as np

from mmpt.engine.config import LoggerConfig
from mmpt.engine.loggers import RunLogger, format_progress
from mmpt.tools.wandb_offline import find_offline_runs, read_offline_run
from mmpt.eval.runner import CaptionSample


def test_progress_line_has_losses_lr_throughput_and_data_wait():
    line = format_progress({"step": 10, "train/loss": 1.5, "train/itc": 1.25, "train/lr": 1e-3,
                            "train/samples_per_s": 512.0, "train/data_wait": 0.04, "train/skipped": 2}, 100)
    assert line == "step 10/100 | loss 1.5000 | itc 1.2500 | lr 1.00e-03 | 512.0 samples/s | data-wait 4% | skipped 2"


def test_progress_line_shows_tflops_and_mfu_as_throughput_not_as_losses():
    record = {"step": 5, "train/loss": 2.0, "train/samples_per_s": 100.0, "train/tflops": 0.0123,
              "train/mfu": 0.0123, "train/data_wait": 0.0}
    assert format_progress(record, 20) == ("step 5/20 | loss 2.0000 | 100.0 samples/s | 0.0123 TFLOP/s | MFU 1.2% | "
                                           "data-wait 0%")
    assert "MFU" not in format_progress({k: v for k, v in record.items() if k != "train/mfu"}, 20)


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
