"""Round-trip real wandb offline runs through mmpt.tools.wandb_offline.

One module-scoped fixture writes two segments of one run id (an initial run
and an offline resume), because each wandb.init costs a service round trip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmpt.tools.wandb_offline import (
    OfflineRun,
    find_offline_runs,
    history_of_run_id,
    main,
    merge_runs,
    read_offline_run,
)

wandb = pytest.importorskip("wandb")

RUN_ID = "mmpttest01"
ITC_1 = [0.5, 0.25, 0.125, 1.5, 2.0]  # steps 0..4 (first segment)
ITC_2 = [3.0, 3.25, 3.5]  # steps 5..7 (resumed segment)
CAPTION = "x" * 70_000  # > 2 blocks: forces FIRST/MIDDLE/LAST chunks


@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wandb_offline")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in [("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")]:
            mp.setenv(var, str(root / sub))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_API_KEY", raising=False)
        try:
            run = wandb.init(mode="offline", dir=root, project="p", group="g", name="first", id=RUN_ID,
                             config={"a": {"b": 1}, "lr": 0.1})
            for step, v in enumerate(ITC_1):
                run.log({"train/itc": v, "opt": {"lr": 0.1 * step}})
            run.config.update({"late": 3})
            run.summary["best_itc"] = 0.125
            run.finish()
            # Offline resume: a new dir with the same id; its step counter starts
            # at 0 again, so continue with explicit steps as a trainer would.
            run = wandb.init(mode="offline", dir=root, project="p", group="g", id=RUN_ID, resume="allow")
            for i, v in enumerate(ITC_2):
                row = {"train/itc": v, **({"caption": CAPTION} if i == 1 else {})}
                run.log(row, step=len(ITC_1) + i)
            run.finish()
        finally:
            wandb.teardown()  # stop the service process under these env vars
    return root


def _segments(root: Path) -> list[Path]:
    paths = find_offline_runs(root / "wandb")
    assert len(paths) == 2, paths  # latest-run symlink must not be counted twice
    return paths


def test_find_offline_runs(wandb_root: Path) -> None:
    first, second = _segments(wandb_root)
    assert first.name == second.name == f"run-{RUN_ID}.wandb"
    assert first.parent != second.parent  # a resumed offline run gets a new dir
    assert first.parent.name.startswith("offline-run-")
    assert find_offline_runs(first) == [first]


def test_read_first_segment(wandb_root: Path) -> None:
    run = read_offline_run(_segments(wandb_root)[0])
    assert (run.run_id, run.project, run.group, run.name) == (RUN_ID, "p", "g", "first")
    assert run.config == {"a": {"b": 1}, "lr": 0.1, "late": 3}
    assert [r["_step"] for r in run.history] == [0, 1, 2, 3, 4]
    assert [r["train/itc"] for r in run.history] == ITC_1
    assert [r["opt"]["lr"] for r in run.history] == [0.1 * s for s in range(5)]
    assert run.summary["best_itc"] == 0.125 and run.summary["train/itc"] == ITC_1[-1]
    assert "_wandb" not in run.config and "_wandb" not in run.summary
    assert run.finished and run.exit_code == 0 and not run.truncated
    assert not run.resume_requested


def test_read_resumed_segment_with_large_record(wandb_root: Path) -> None:
    path = _segments(wandb_root)[1]
    assert path.stat().st_size > 2 * 32 * 1024
    run = read_offline_run(path)
    assert run.run_id == RUN_ID and run.resume_requested
    assert [r["_step"] for r in run.history] == [5, 6, 7]
    assert run.history[1]["caption"] == CAPTION
    assert run.config == {}  # no config passed to the resuming init


def test_merge_resumed_run(wandb_root: Path) -> None:
    segs = [read_offline_run(p) for p in _segments(wandb_root)]
    merged = merge_runs(reversed(segs))  # input order must not matter
    assert merged.run_id == RUN_ID and merged.name == "first" and merged.group == "g"
    assert [r["_step"] for r in merged.history] == list(range(8))
    assert [r["train/itc"] for r in merged.history] == ITC_1 + ITC_2
    assert merged.config == {"a": {"b": 1}, "lr": 0.1, "late": 3}
    assert merged.summary["best_itc"] == 0.125 and merged.summary["train/itc"] == ITC_2[-1]
    assert merged.paths == [s.paths[0] for s in segs] and merged.finished
    assert history_of_run_id(wandb_root, RUN_ID) == merged.history
    with pytest.raises(FileNotFoundError):
        history_of_run_id(wandb_root, "nope")
    with pytest.raises(ValueError):
        merge_runs([segs[0], OfflineRun(run_id="other")])


@pytest.mark.parametrize("segment", [0, 1])
def test_truncated_file_reads_complete_prefix(wandb_root: Path, tmp_path: Path, segment: int) -> None:
    src = _segments(wandb_root)[segment]
    data, full = src.read_bytes(), read_offline_run(src).history
    cut_file = tmp_path / src.name
    stride = 1 if len(data) < 8192 else 97
    cuts = sorted({*range(8, len(data), stride), 32 * 1024, 32 * 1024 + 1, len(data) // 2, len(data) - 1})
    boundaries: set[int] = set()  # cuts that fall exactly between chunks
    partial_prefixes = 0  # cuts that keep some but not all history rows
    for cut in (c for c in cuts if c < len(data)):
        cut_file.write_bytes(data[:cut])
        run = read_offline_run(cut_file)  # must not raise
        assert run.history == full[: len(run.history)], cut
        partial_prefixes += 0 < len(run.history) < len(full)
        if not run.truncated:
            boundaries.add(cut)
    assert len(boundaries) < len(cuts) // 2  # most cuts land inside a chunk
    cut_file.write_bytes(data[:-1])
    assert read_offline_run(cut_file).truncated
    # a cut after the first rows keeps them (where the rows sit in the file depends on how much system/config
    # data wandb wrote first, so no fixed offset is asserted)
    assert partial_prefixes > 0


def test_header_only_and_garbage(tmp_path: Path, wandb_root: Path) -> None:
    src = _segments(wandb_root)[0]
    header_only = tmp_path / "run-h.wandb"
    header_only.write_bytes(src.read_bytes()[:7])  # what a hard-killed run can leave
    run = read_offline_run(header_only)
    assert run.history == [] and not run.truncated and not run.finished and run.run_id == "h"
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError):
        read_offline_run(bad)


def test_corrupt_chunk_stops_cleanly(wandb_root: Path, tmp_path: Path) -> None:
    src = _segments(wandb_root)[0]
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # payload or header damage: CRC or framing fails
    bad = tmp_path / src.name
    bad.write_bytes(bytes(data))
    run = read_offline_run(bad)
    full = read_offline_run(src).history
    assert run.truncated and run.history == full[: len(run.history)]


def test_cli(wandb_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(wandb_root)]) == 0
    out = capsys.readouterr().out
    assert f"run {RUN_ID}" in out and "segments: 2" in out and "history rows: 8" in out
    assert "a.b" in out and '"_step": 7' in out
    assert main([str(wandb_root), "--run-id", "nope"]) == 1
