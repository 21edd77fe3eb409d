"""Exact resume: a loader started from a saved `LoaderState` yields the very batches (keys, pixels, masks) the
uninterrupted loader yields after that point; through the CLI, a run killed with SIGKILL and resumed with the
same command ends with weights bitwise equal to an uninterrupted run's and logs the same per-step losses."""
from __future__ import annotations

import json
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mmpt.data import pipeline
from mmpt.data.masking import BlockMasker
from mmpt.data.pipeline import build_train_loader
from mmpt.data.sources import SourceSpec, build_mixed_train_loader
from mmpt.data.stream_state import LoaderState
from mmpt.data.tokenizer import TextTokenizer, train_wordpiece
from mmpt.engine.checkpoint import complete_checkpoints, load_model_weights
from tests.dist_helpers import kill_tree
from tests.test_train_e2e import BIN, metrics

SIZE = 16
WORDS = ["red", "blue", "circle", "square", "small", "large", "on", "a", "the", "picture"]


def caption(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 4))


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_wordpiece([caption(i) for i in range(40)], vocab_size=100), max_len=12)


@pytest.fixture
def shards(write_shards, image_bytes) -> list[str]:
    """4 shards of 5 samples; one corrupt image and one caption-less sample, so skips shift the cursors."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    out = []
    for s in range(4):
        samples = [{"__key__": f"s{s}_{i}", "jpg": image_bytes(colours[(s + i) % 4], size=(24, 20)),
                    "txt": caption(5 * s + i)} for i in range(5)]
        if s == 1:
            samples[2] = {"__key__": "bad", "jpg": b"not a jpeg", "txt": "a"}
        if s == 2:
            samples[4] = {"__key__": "no_txt", "jpg": image_bytes()}
        out.append(samples)
    return write_shards(out)


def snapshot(state: LoaderState) -> LoaderState:
    return LoaderState.from_dict(json.loads(json.dumps(state.to_dict())))  # as a checkpoint stores it


def consume(loader, n: int) -> tuple[list, LoaderState]:
    it = iter(loader)
    return [next(it) for _ in range(n)], snapshot(loader.state)


def assert_same(got, want) -> None:
    assert [b.keys for b in got] == [b.keys for b in want]
    for g, w in zip(got, want):
        assert torch.equal(g.images, w.images) and torch.equal(g.input_ids, w.input_ids)
        if w.image_mask is not None:
            assert torch.equal(g.image_mask, w.image_mask)


@pytest.mark.parametrize("workers, stop", [(0, 7), (2, 7)])
def test_resumed_loader_continues_the_stream_exactly(shards, tokenizer, monkeypatch, workers, stop):
    # blocks of 2 shards (>= 6 raw samples): the batches cross several block ends; an odd stop with 2 workers
    # makes worker 1 come first after the resume
    monkeypatch.setattr(pipeline, "MIN_BLOCK_SAMPLES", 6)
    monkeypatch.setattr(pipeline, "BLOCK_SAMPLES_PER_BUFFER_SLOT", 1)
    kw = dict(batch_size=3, image_size=SIZE, num_workers=workers, seed=5, rank=1, world_size=2, shuffle_buffer=4,
              image_mask=BlockMasker(4, 4, num_masked=5, min_patches=2))
    full, _ = consume(build_train_loader(shards, tokenizer, **kw), 10)
    _, saved = consume(build_train_loader(shards, tokenizer, **kw), stop)
    assert saved.batches == stop and sorted(saved.cursors) == list(range(max(workers, 1)))
    resumed, _ = consume(build_train_loader(shards, tokenizer, resume=saved, **kw), 10 - stop)
    assert_same(resumed, full[stop:])
    assert max(c[0][0] for c in saved.cursors.values()) > 0  # a stream resumes past a block end
    fresh, _ = consume(build_train_loader(shards, tokenizer, **kw), 10 - stop)
    assert [b.keys for b in fresh] != [b.keys for b in full[stop:]]  # the check can fail: restarting differs


def test_resumed_mixed_loader_continues_every_source(write_shards, image_bytes, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_BLOCK_SAMPLES", 4)
    pairs = write_shards([[{"__key__": f"p{s}_{i}", "jpg": image_bytes(), "txt": caption(i)} for i in range(4)]
                          for s in range(3)], name="pairs")
    texts = write_shards([[{"__key__": f"t{s}_{i}", "txt": caption(i + s)} for i in range(3)] for s in range(2)],
                         name="texts")
    specs = [SourceSpec("pairs", "pairs", pairs, 2.0), SourceSpec("texts", "texts", texts, 1.0)]
    kw = dict(batch_size=3, image_size=SIZE, num_workers=0, seed=1, rank=0, world_size=1, shuffle_buffer=3)
    full, _ = consume(build_mixed_train_loader(specs, tokenizer, **kw), 9)
    _, saved = consume(build_mixed_train_loader(specs, tokenizer, **kw), 4)
    resumed, _ = consume(build_mixed_train_loader(specs, tokenizer, resume=saved, **kw), 5)
    assert_same([b.parts["pairs"] for b in resumed], [b.parts["pairs"] for b in full[4:]])
    assert [b.parts["texts"].keys for b in resumed] == [b.parts["texts"].keys for b in full[4:]]


@pytest.mark.parametrize("world, workers, needle", [
    (1, 2, "written by 2 ranks but this launch has 1"),
    (2, 1, "data.num_workers=2 per rank but this launch has data.num_workers=1"),
])
def test_resume_with_other_stream_count_is_refused(shards, tokenizer, world, workers, needle):
    saved = LoaderState(world_size=2, num_workers=2, batches=4)
    with pytest.raises(ValueError, match=needle):
        build_train_loader(shards, tokenizer, batch_size=2, image_size=SIZE, num_workers=workers, seed=0, rank=0,
                           world_size=world, resume=saved)
    # 0 workers and 1 worker are one stream each: that resume is exact and allowed
    build_train_loader(shards, tokenizer, batch_size=2, image_size=SIZE, num_workers=1, seed=0, rank=0,
                       world_size=1, resume=LoaderState(world_size=1, num_workers=0))


# ---------------------------------------------------------------- through the CLI (slow)

TINY = ["experiment=clip_tiny", "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=32",
        "model.patch_dropout=0.5", "model.text.dropout=0.1",  # drawn from the global torch RNG: restored too
        "trainer.log_every=1", "trainer.save_every=5", "trainer.keep_last=2", "eval.every=5",
        "scheduler.warmup_steps=5", "logger=none"]  # W&B across a resume: tests/test_preemption.py


def launch(run_dir: Path, world: int, overrides: list[str]) -> list[str]:
    head = [str(BIN / "mmpt-train")]
    if world > 1:
        head = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(world), "--no-python", *head]
    return [*head, *TINY, *overrides, f"hydra.run.dir={run_dir}"]


def kill_at_random_step_after(cmd: list[str], env: dict, run_dir: Path, step: int, log: Path) -> int:
    """Start a run; SIGKILL all its processes once checkpoint `step` is complete and a random later step is logged."""
    target = step + random.Random().randint(1, 4)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        marker, deadline = run_dir / "checkpoints" / f"step_{step:08d}" / "complete", time.time() + 240
        while not (marker.exists() and max((r["step"] for r in metrics(run_dir)), default=0) >= target):
            assert proc.poll() is None, f"run ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        kill_tree(proc.pid)  # like a node failure: every process at once
        proc.wait(timeout=30)
    killed_at = max(r["step"] for r in metrics(run_dir))
    assert killed_at >= target
    return killed_at


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in metrics(run_dir) if "train/loss" in r]


def check_exact_resume(env: dict, tmp_path: Path, world: int, overrides: list[str], max_steps: int) -> Path:
    overrides = [*overrides, f"trainer.max_steps={max_steps}"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    done = subprocess.run(launch(straight, world, overrides), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    killed_at = kill_at_random_step_after(launch(broken, world, overrides), env, broken, 5, tmp_path / "killed.log")
    assert killed_at < max_steps, "the run finished before it could be killed; raise max_steps"
    # the newest complete checkpoint: killed_at's multiple of 5, or the one before when the kill hit its save
    newest = int(complete_checkpoints(broken / "checkpoints")[-1].name.split("_")[1])
    saving = killed_at % 5 == 0
    assert newest == killed_at // 5 * 5 or (saving and newest == killed_at - 5), (killed_at, newest)
    resumed = subprocess.run(launch(broken, world, overrides), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    start = re.search(r"resumed from \S+step_(\d+) at step (\d+)", resumed.stdout + resumed.stderr)
    assert start and int(start.group(2)) == newest, (killed_at, newest, start)

    want = dict(losses(straight))
    assert sorted(want) == list(range(1, max_steps + 1))
    got = losses(broken)  # the steps logged twice (after the checkpoint, before the kill) too
    assert {s for s, _ in got} == set(want) and len(got) > max_steps
    assert [(s, want[s]) for s, _ in got] == got
    kept = [p.name for p in complete_checkpoints(broken / "checkpoints")]
    assert kept == [f"step_{max_steps - 1:08d}", f"step_{max_steps:08d}"]  # keep_last=2, across the kill too
    a = load_model_weights(straight / "checkpoints" / kept[-1])
    b = load_model_weights(broken / "checkpoints" / kept[-1])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    return broken


def refused(run: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a run that must stop with exit code 2."""
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(set(errors)) == 1, run.stdout[-2000:] + run.stderr[-2000:]
    return errors[0]


@pytest.mark.slow
def test_single_process_killed_run_resumes_bitwise_and_refuses_other_workers(demo_env, tmp_path):
    run_dir = check_exact_resume(demo_env, tmp_path, 1, ["data.num_workers=0"], max_steps=16)
    other = subprocess.run(launch(run_dir, 1, ["data.num_workers=2", "trainer.max_steps=20"]), env=demo_env,
                           capture_output=True, text=True, timeout=300)
    error = refused(other)
    assert "data.num_workers=0 per rank but this launch has data.num_workers=2" in error
    assert "set data.num_workers=0" in error and "model.init.checkpoint" in error


@pytest.mark.slow
def test_two_process_killed_run_resumes_bitwise_and_refuses_another_world(demo_env, tmp_path):
    run_dir = check_exact_resume(demo_env, tmp_path, 2, ["data.num_workers=2", "deepspeed=zero2"], max_steps=16)
    other = subprocess.run(launch(run_dir, 1, ["data.num_workers=2", "deepspeed=zero2", "trainer.max_steps=20"]),
                           env=demo_env, capture_output=True, text=True, timeout=300)
    error = refused(other)
    assert "written by 2 ranks but this launch has 1" in error and "model.init.checkpoint" in error
