"""scripts/bench/bench_gpu_mfu.py, run where CI runs (no GPU): the batch search, the trainer's step and the
table it writes between the markers of a docs file; a file without the markers is refused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "bench_gpu_mfu.py"
MARKER = "<!-- gpu-mfu -->"


def _run(tmp_path: Path, doc: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--models", "clip/tiny", "--max-batch", "16",
           "--steps", "1", "--warmup", "1", "--no-compile", "--write", str(doc), *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_mfu_bench_searches_the_batch_and_writes_its_table_on_cpu(tmp_path: Path) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(f"# before\n{MARKER}\nnot measured yet\n{MARKER}\n# after\n")
    proc = _run(tmp_path, doc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = doc.read_text()
    assert text.startswith("# before\n") and text.endswith("# after\n") and "not measured yet" not in text
    table = text.split(MARKER)[1]
    assert "CPU" in table and "bench_gpu_mfu.py --device cpu --models clip/tiny" in table
    row = next(line for line in table.splitlines() if line.startswith("| `clip/tiny`"))
    _, model, batch, rate, _, mfu, _ = (cell.strip() for cell in row.split("|"))
    assert batch == "16" and float(rate.replace(",", "")) > 0 and mfu == "-"  # 8 and 16 fit; no peak on CPU


@pytest.mark.slow
def test_gpu_mfu_bench_refuses_a_file_without_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# no markers here\n")
    proc = _run(tmp_path, doc, "--batch", "8")
    assert proc.returncode == 2 and "error: " in proc.stderr
    assert "needs exactly two '<!-- gpu-mfu -->' lines" in proc.stderr
    assert doc.read_text() == "# no markers here\n"


def test_gpu_mfu_bench_without_a_gpu_says_so_unless_asked_for_cpu(tmp_path: Path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "clip/tiny"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no GPU here") and "--device cpu" in proc.stderr
