"""mmpt-report: the table's final/best values and steps from metrics.jsonl, one row per multirun job with its
overrides, PNGs of every metric, and one clear error when matplotlib or the runs are missing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmpt.cli.report import main
from mmpt.tools.run_report import find_runs, read_curves

pytest.importorskip("matplotlib")


def write_run(run_dir: Path, records: list[dict], overrides: list[str] | None = None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


def job_records(losses: list[float], r1: list[float]) -> list[dict]:
    """Train records at steps 10, 20, ...; an eval record (R@1 and a count) after every second one."""
    records: list[dict] = []
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        records.append({"step": step, "train/loss": loss, "train/lr": 1e-3 / (i + 1), "train/samples_per_s": 100.0 + i})
        if i % 2 == 1:
            records.append({"step": step, "eval/retrieval/i2t_r1": r1[i // 2], "eval/retrieval/num_images": 400.0,
                            "eval/retrieval/skipped": 2.0})
    return records


def test_multirun_table_has_one_row_per_job_with_its_swept_override_and_plots(tmp_path, capsys):
    multi = tmp_path / "multirun" / "2026-12-07_10-00-00"
    write_run(multi / "0", job_records([3.0, 2.5, 2.0, 1.5], [0.25, 0.5]), ["experiment=clip_tiny", "optimizer.lr=0.001"])
    write_run(multi / "1", job_records([3.0, 2.8, 2.9, 2.6], [0.375, 0.125]), ["experiment=clip_tiny", "optimizer.lr=0.0003"])
    (multi / "2" / ".hydra").mkdir(parents=True)  # a job that failed before its first log line
    (multi / "2" / ".hydra" / "overrides.yaml").write_text("- experiment=clip_tiny\n- optimizer.lr=0.1\n")
    out = tmp_path / "report"
    assert main([str(multi), "--out", str(out), "--dpi", "50"]) == 0

    table = (out / "report.md").read_text()
    assert "| 2026-12-07_10-00-00/0 | `optimizer.lr=0.001` | 40 | 1.5 | 101.5 | 0.5 (0.5 @ 40) |" in table
    assert "| 2026-12-07_10-00-00/1 | `optimizer.lr=0.0003` | 40 | 2.6 | 101.5 | 0.125 (0.375 @ 20) |" in table
    assert "| 2026-12-07_10-00-00/2 | `optimizer.lr=0.1` | no metrics.jsonl (failed before its first log?) | - | - | - |" in table
    assert "Overrides shared by all runs above: `experiment=clip_tiny`" in table
    assert "| eval/retrieval/i2t_r1 | 2026-12-07_10-00-00/1 | 0.125 | 0.375 | 20 |" in table
    assert "num_images" not in table and "skipped" not in table  # counts, not metrics
    printed = capsys.readouterr().out
    assert "| 2026-12-07_10-00-00/1 | `optimizer.lr=0.0003` |" in printed and printed.endswith("report.md\n")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["eval_retrieval_i2t_r1.png", "train_loss.png", "train_lr.png", "train_samples_per_s.png"]
    assert all(f"]({name})" in table for name in pngs)
    with Image.open(out / "train_loss.png") as image:
        assert image.format == "PNG" and 200 < image.size[0] <= 320 and image.size[1] > 150  # tight bbox at dpi 50


def test_runs_overlaid_and_a_resumed_run_keeps_the_later_values(tmp_path):
    a = write_run(tmp_path / "runs" / "a", [{"step": 10, "train/loss": 2.0}, {"step": 20, "train/loss": 1.75},
                                            # resumed from step 10: its step 20 replaces the first one
                                            {"step": 20, "train/loss": 1.5}, {"step": 30, "train/loss": 1.25}])
    assert read_curves(a / "metrics.jsonl") == {"train/loss": [(10, 2.0), (20, 1.5), (30, 1.25)]}
    write_run(tmp_path / "runs" / "b", [{"step": 10, "train/loss": 2.5, "train/skipped": 0}])
    runs = find_runs(tmp_path / "runs")
    assert [(r.name, r.last_step) for r in runs] == [("runs/a", 30), ("runs/b", 10)]
    assert main([str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"), "--out", str(tmp_path / "r"), "--dpi", "20"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == ["train_loss.png"]  # skipped: not plotted


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope'} is not a directory")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err
    write_run(tmp_path / "run", [{"step": 1, "train/loss": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mmpt-report draws its plots with matplotlib") and "pip install 'mmpt[report]'" in err
    assert err.count("\n") == 1
