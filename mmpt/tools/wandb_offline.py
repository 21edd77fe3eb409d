"""Read W&B run files (``run-<id>.wandb``) without a W&B server.

wandb has no public reader for its transaction log, yet offline runs (and CI
tests) need a way to check what was logged.  The format, checked against
wandb 0.31 (wandb-core writes it):

* a 7-byte header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0``;
* then a LevelDB log: 32 KiB blocks of chunks, each ``crc32 (u32 LE) |
  length (u16 LE) | type (u8)`` + payload.  The CRC is plain (IEEE, unmasked)
  ``zlib.crc32`` over the type byte and payload -- not LevelDB's masked
  crc32c.  A block tail shorter than a chunk header is zero padding.  Block
  boundaries are file offsets, so the file header eats into block 0;
* each reassembled record is a ``wandb.proto.wandb_internal_pb2.Record``.

Usage: ``python -m mmpt.tools.wandb_offline PATH [--run-id ID]``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "OfflineRun",
    "find_offline_runs",
    "history_of_run_id",
    "iter_records",
    "merge_runs",
    "read_offline_run",
]

_FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic, version
_MAGIC, _VERSION = 0xBEE1, 0
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one (or several merged) run files say was logged."""

    run_id: str
    project: str | None = None
    group: str | None = None
    name: str | None = None
    entity: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    # Resume info: offline wandb cannot see earlier segments, so ``resumed``
    # (set by the server) stays False; ``resume_requested`` is what init() asked.
    resumed: bool = False
    resume_requested: bool = False
    starting_step: int = 0
    start_time: float | None = None
    exit_code: int | None = None  # None: no exit record (killed / still running)
    truncated: bool = False  # file ended in a partial or corrupt chunk
    paths: list[Path] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """True when wandb.finish() got as far as writing the exit record."""
        return self.exit_code is not None


def find_offline_runs(root: str | Path) -> list[Path]:
    """All ``run-*.wandb`` files under ``root``, oldest first (by mtime).

    Symlinks (``wandb/latest-run``) are not followed, so each file shows once.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    found: list[Path] = []
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        found += [Path(dirpath, f) for f in files if f.startswith("run-") and f.endswith(".wandb")]
    return sorted(found, key=lambda p: (p.stat().st_mtime, str(p)))


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Yield serialized records; stop quietly at a truncated or corrupt tail.

    A run killed mid-write leaves a partial chunk (or a FIRST without LAST) at
    the end; everything before it is still returned (``read_offline_run``
    reports that case as ``OfflineRun.truncated``).
    """
    for rec in _read_chunks(Path(path).read_bytes()):
        if rec is None:
            return
        yield rec


def _read_chunks(data: bytes) -> Iterator[bytes | None]:
    """Reassemble LevelDB-log records; yields ``None`` once on a bad tail."""
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"not a W&B run file: only {len(data)} bytes")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != _MAGIC or version != _VERSION:
        raise ValueError(f"not a W&B run file (header {data[:7]!r})")
    pos, parts = _FILE_HEADER.size, None  # parts: pending FIRST/MIDDLE payloads
    while pos < len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # zero padding at a block's end
            pos += left_in_block
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            break
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start, end = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if end > len(data) or length > left_in_block - _CHUNK_HEADER.size:
            break
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            break
        pos = end
        if kind == _FULL and parts is None:
            yield payload
        elif kind == _FIRST and parts is None:
            parts = [payload]
        elif kind == _MIDDLE and parts is not None:
            parts.append(payload)
        elif kind == _LAST and parts is not None:
            yield b"".join(parts + [payload])
            parts = None
        else:  # out-of-order chunk: treat like corruption, keep what we have
            break
    if pos < len(data) or parts is not None:
        yield None


def _decode(value_json: str) -> Any:
    # Python's json accepts the NaN/Infinity tokens wandb writes for floats.
    return json.loads(value_json) if value_json else None


def _key_path(item: Any) -> list[str]:
    return list(item.nested_key) or [item.key]


def _set(d: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[path[-1]] = value


def _remove(d: dict[str, Any], path: Sequence[str]) -> None:
    for k in path[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(path[-1], None)


def _apply(target: dict[str, Any], rec: Any) -> None:
    """Apply a ConfigRecord/SummaryRecord (``update`` + ``remove``) in place."""
    for item in rec.update:
        _set(target, _key_path(item), _decode(item.value_json))
    for item in rec.remove:
        _remove(target, _key_path(item))


def read_offline_run(path: str | Path) -> OfflineRun:
    """Decode one run file: run info, config, per-step history and summary.

    Decoded record types: ``run`` (id/project/group/name/initial config/resume
    flags), ``config``, ``history``, ``summary`` and ``exit``; the rest
    (telemetry, stats, output, files, ...) is skipped.  History and summary
    keys logged as nested dicts come back as nested dicts, as logged.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: wandb is slow to import

    path = Path(path)
    run = OfflineRun(run_id=path.stem.removeprefix("run-"), paths=[path])
    for raw in _read_chunks(path.read_bytes()):
        if raw is None:
            run.truncated = True
            break
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # CRC-valid but unknown to this wandb: skip it
            continue
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            _apply_run_record(run, rec.run)
        elif kind == "config":
            _apply(run.config, rec.config)
        elif kind == "summary":
            _apply(run.summary, rec.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _set(row, _key_path(item), _decode(item.value_json))
            row.setdefault("_step", rec.history.step.num)
            run.history.append(row)
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    run.config.pop("_wandb", None)
    run.summary.pop("_wandb", None)
    return run


def _apply_run_record(run: OfflineRun, r: Any) -> None:
    """Fill run info; later run records (rare) only overwrite set fields."""
    run.run_id = r.run_id or run.run_id
    run.project = r.project or run.project
    run.group = r.run_group or run.group
    run.name = r.display_name or run.name
    run.entity = r.entity or run.entity
    run.job_type = r.job_type or run.job_type
    run.tags = list(r.tags) or run.tags
    run.resumed = run.resumed or r.resumed
    run.resume_requested = run.resume_requested or r.resume
    run.starting_step = r.starting_step or run.starting_step
    if r.HasField("start_time"):
        run.start_time = r.start_time.seconds + r.start_time.nanos / 1e9
    _apply(run.config, r.config)
    _apply(run.summary, r.summary)


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def merge_runs(
    runs: Iterable[OfflineRun], order: Literal["step", "segment"] = "step"
) -> OfflineRun:
    """Join the segments of one run id (each resume writes a new run dir).

    Segments go by start time; config and summary are deep-merged (later wins).
    ``order="step"`` stable-sorts history by ``_step``; ``"segment"`` keeps
    write order -- use it when a resumed offline run restarted ``_step`` at 0
    (it does unless ``wandb.log(..., step=)`` is passed explicitly).
    """
    segs = sorted(runs, key=lambda r: (r.start_time is None, r.start_time or 0.0))
    if not segs:
        raise ValueError("merge_runs needs at least one run")
    ids = {r.run_id for r in segs}
    if len(ids) > 1:
        raise ValueError(f"cannot merge different run ids: {sorted(ids)}")
    merged = replace(segs[0], config={}, history=[], summary={}, paths=[], tags=[])
    for seg in segs:
        for name in ("project", "group", "name", "entity", "job_type"):
            if getattr(seg, name) is not None:
                setattr(merged, name, getattr(seg, name))
        merged.tags = seg.tags or merged.tags
        merged.resumed |= seg.resumed
        merged.resume_requested |= seg.resume_requested
        merged.truncated |= seg.truncated
        merged.exit_code = seg.exit_code  # the last segment decides
        _deep_update(merged.config, seg.config)
        _deep_update(merged.summary, seg.summary)
        merged.history += seg.history
        merged.paths += seg.paths
    if order == "step":
        merged.history.sort(key=lambda row: row.get("_step", 0))
    return merged


def history_of_run_id(
    root: str | Path, run_id: str, order: Literal["step", "segment"] = "step"
) -> list[dict[str, Any]]:
    """History of every segment of ``run_id`` under ``root``, merged."""
    runs = [read_offline_run(p) for p in find_offline_runs(root) if p.name == f"run-{run_id}.wandb"]
    runs = [r for r in runs if r.run_id == run_id]
    if not runs:
        raise FileNotFoundError(f"no run file for run id {run_id!r} under {root}")
    return merge_runs(runs, order=order).history


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for k, v in d.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k]
    return keys


def _short(obj: Any, limit: int = 400) -> str:
    text = json.dumps(obj, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def main(argv: Sequence[str] | None = None) -> int:
    """Print a short report per run id found under PATH (file, run dir or root)."""
    ap = argparse.ArgumentParser(
        prog="python -m mmpt.tools.wandb_offline", description="Summarize W&B offline run files."
    )
    ap.add_argument("path", type=Path, help="a run-*.wandb file, an offline run dir or a wandb root")
    ap.add_argument("--run-id", help="only this run id")
    ap.add_argument("--order", choices=("step", "segment"), default="step")
    args = ap.parse_args(argv)
    by_id: dict[str, list[OfflineRun]] = {}
    for p in find_offline_runs(args.path):
        r = read_offline_run(p)
        if args.run_id in (None, r.run_id):
            by_id.setdefault(r.run_id, []).append(r)
    if not by_id:
        print(f"no run-*.wandb files under {args.path}", file=sys.stderr)
        return 1
    for segs in by_id.values():
        run = merge_runs(segs, order=args.order)
        state = "finished" if run.finished else "not finished"
        print(f"run {run.run_id}  project={run.project} group={run.group} name={run.name}")
        print(f"  segments: {len(segs)} ({state}{', truncated' if run.truncated else ''})")
        for p in run.paths:
            print(f"    {p}")
        print(f"  config keys: {', '.join(_flat_keys(run.config)) or '-'}")
        print(f"  history rows: {len(run.history)}")
        if run.history:
            print(f"  last row: {_short(run.history[-1])}")
        print(f"  summary: {_short(run.summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
