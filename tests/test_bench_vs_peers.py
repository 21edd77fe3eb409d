"""scripts/bench/bench_vs_peers.py without its peers (the test venv has none of them): every pair prints a
skip line and the script exits cleanly, and its shared helpers build the inputs both sides get."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "bench_vs_peers.py"
PEERS = ("open_clip", "torchscale", "torchmultimodal")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.skipif(any(importlib.util.find_spec(p) is not None for p in PEERS), reason="a peer is installed here")
def test_missing_peers_print_skip_lines(monkeypatch, capsys) -> None:
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["bench_vs_peers.py", "--rounds", "1", "--steps", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "clip: skipped (open_clip is not installed)" in out
    assert "coca: skipped (open_clip is not installed)" in out
    assert "beit3: skipped (torchscale is not installed)" in out
    assert "albef: skipped (torchmultimodal is not installed)" in out
    assert "summary" not in out  # nothing was timed


def test_caption_batch_is_right_padded_with_eot_last() -> None:
    """Both sides read the same ids: BOS first, the largest id (CLIP's EOT, pooled by argmax) last, pad 0."""
    ids, mask = load_bench().caption_batch(16, 12, 100, torch.Generator().manual_seed(0))
    lengths = mask.sum(dim=1)
    assert (ids[:, 0] == 1).all() and (lengths >= 6).all()
    assert torch.equal(ids.argmax(dim=1), lengths - 1)  # EOT = 99 at the last real position
    assert ((ids == 0) == (mask == 0)).all()  # pads exactly where the mask is 0
