"""Atomic, space-safe checkpoints: a tag is renamed into place whole, a re-save after a rollback replaces it
whole, pruning never takes the tag just saved, a failed write (disk full, on any rank) stops cleanly with
earlier tags intact, and every reader (mmpt-eval, resume, model.init.checkpoint) refuses an incomplete or
corrupt tag in one line.

The save tests share one run of tests/atomic_ckpt_worker.py: two real DeepSpeed ranks (gloo, ZeRO-1) saving the
way the trainer does, broken by an exception and by ENOSPC half-way through a file, killed with SIGKILL half-way
through a file, and, where `unshare -rm` can mount one, writing onto a tmpfs too small for a second checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpt.cli.common import user_errors_exit
from mmpt.engine.checkpoint import (COMPLETE_MARKER, complete_checkpoints, init_checkpoint_source, latest_checkpoint,
                                    remove_stale_saves, resolve_checkpoint_dir, resume_target, tag_for)
from mmpt.engine.checkpoint_integrity import CheckpointError, manifest, tag_problem
from mmpt.engine.config import ConfigError, TrainConfig
from mmpt.engine.run_setup import check_model_setup
from mmpt.models.clip import CLIPConfig
from mmpt.models.pretrained import InitConfig

ROOT = Path(__file__).resolve().parents[1]
STATES = "mp_rank_00_model_states.pt"


def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def can_mount_tmpfs() -> bool:
    """A user + mount namespace where this user may mount a tmpfs (Linux with unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


def states_version(tag_dir: Path) -> float:
    """The one number every parameter of the worker's toy model holds in this tag."""
    module = torch.load(tag_dir / STATES, map_location="cpu", weights_only=False)["module"]
    values = torch.cat([v.flatten() for v in module.values()]).unique()
    assert values.numel() == 1, values
    return float(values[0])


# ---- saving: two real DeepSpeed ranks, broken on purpose ------------------------------------------------------
@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], bool]:
    """Run tests/atomic_ckpt_worker.py once (2 ranks, ZeRO-1): its out dir, each rank's results, tmpfs or not."""
    out = tmp_path_factory.mktemp("saves")
    tmpfs = can_mount_tmpfs()
    cmd = [sys.executable, "-m", "tests.atomic_ckpt_worker", str(out), *(["--tmpfs"] if tmpfs else [])]
    proc = subprocess.Popen(["unshare", "-rm", *cmd] if tmpfs else cmd, cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=400)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1 too, should it have outlived rank 0
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, log[-4000:]  # rank 0 SIGKILLed itself mid-save
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)], tmpfs


TAGS = [tag_for(s) for s in range(4)]


@pytest.mark.slow
def test_keep_last_prunes_only_after_the_new_tag_is_in_place_and_never_the_tag_just_saved(saves):
    _, ranks, _ = saves
    for keep in (r["keep"] for r in ranks):
        # keep_last=2 over steps 1, 2, 3: the tag just saved and the one before; `latest` names the newest
        assert [s["complete"] for s in keep["after_each"]] == [TAGS[1:2], TAGS[1:3], TAGS[2:4]]
        assert [s["latest"] for s in keep["after_each"]] == TAGS[1:4]
        assert all(s["hidden"] == [] and set(s["problems"].values()) == {None} for s in keep["after_each"])
        # after 10, 20, then 15 (a resume from 10 with another save_every) with keep_last=1: 15 stays, 20 goes
        assert keep["after_15"]["complete"] == [tag_for(15)] and keep["after_15"]["latest"] == tag_for(15)
        assert keep["version_15"] == 15.0


@pytest.mark.slow
def test_a_resave_interrupted_between_files_leaves_the_old_tag_whole(saves):
    _, ranks, _ = saves
    for rank in ranks:
        raised = rank["raise"]
        assert raised["raised"] == "Boom: stopped between files" and raised["seen"]["complete"] == TAGS[1:4]
        assert set(raised["seen"]["problems"].values()) == {None} and raised["version_3"] == 3.0
        assert len(raised["seen"]["hidden"]) == 1 and raised["seen"]["hidden"][0].startswith(f".tmp-{TAGS[3]}-")
        assert raised["after_cleanup"]["hidden"] == [] and raised["after_cleanup"]["complete"] == TAGS[1:4]
    assert ranks[0]["raise"]["removed"] == ranks[0]["raise"]["seen"]["hidden"]


@pytest.mark.slow
def test_disk_full_on_one_rank_stops_every_rank_with_one_message_and_earlier_tags_intact(saves):
    out, ranks, _ = saves
    root = out / "full" / "checkpoints"
    message = ranks[0]["full"]["raised"]
    assert ranks[1]["full"]["raised"] == message  # rank 0 learned of rank 1's failure instead of hanging
    assert message.startswith(f"CheckpointError: could not save checkpoint {TAGS[3]} in {root}: disk full writing "
                              f"{root}/.tmp-{TAGS[3]}-")
    assert f"/{TAGS[3]}/zero_pp_rank_1_mp_rank_00_optim_states.pt (No space left on device; " in message
    assert f"the partial save was removed and the last complete checkpoint, {root / TAGS[3]}, is intact" in message
    assert "point hydra.run.dir at a larger disk" in message and "\n" not in message
    for rank in ranks:
        assert rank["full"]["seen"]["hidden"] == [] and rank["full"]["seen"]["complete"] == TAGS[1:4]
        assert rank["full"]["versions"] == {"1": 1.0, "2": 2.0, "3": 3.0}  # 3 is the old one, not the rollback's


@pytest.mark.slow
def test_a_real_full_disk_stops_cleanly_and_the_earlier_tag_still_loads(saves):
    out, ranks, tmpfs = saves
    if not tmpfs:
        pytest.skip("cannot mount a tmpfs here (`unshare -rm` unavailable); the injected ENOSPC test still runs")
    root = out / "tmpfs" / "checkpoints"
    for rank in ranks:  # torch's zip writer fails with a RuntimeError: still a full disk, said so
        real = rank["tmpfs"]
        assert real["raised"] == ranks[0]["tmpfs"]["raised"]
        assert real["raised"].startswith(f"CheckpointError: could not save checkpoint {TAGS[2]} in {root}: disk full ")
        assert "no space left on device" in real["raised"].lower() and f"{root / TAGS[1]}, is intact" in real["raised"]
        assert real["seen"]["complete"] == TAGS[1:2] and real["seen"]["hidden"] == [] and real["version_1"] == 1.0


@pytest.mark.slow
def test_kill_mid_resave_after_rollback_leaves_the_old_complete_tag_and_hidden_partial_files(saves):
    out, _, _ = saves
    root = out / "kill" / "checkpoints"
    # readers see the old, whole step 3, never the half-written files of its re-save
    assert [p.name for p in complete_checkpoints(root)] == TAGS[1:4]
    assert tag_problem(root / TAGS[3]) is None and states_version(root / TAGS[3]) == 3.0
    assert resume_target("auto", root) == root / TAGS[3] == resolve_checkpoint_dir(root.parent)
    assert (root / "latest").read_text() == TAGS[3]
    (staging,) = [p for p in root.iterdir() if p.name.startswith(".")]
    partial = sorted(p.name for p in (staging / TAGS[3]).iterdir())
    assert staging.name.startswith(f".tmp-{TAGS[3]}-") and COMPLETE_MARKER not in partial
    assert STATES in partial and (staging / TAGS[3] / STATES).stat().st_size < (root / TAGS[3] / STATES).stat().st_size
    assert remove_stale_saves(root) == [staging] and not staging.exists()  # what the next start does


def test_write_failures_say_disk_full_by_errno_or_by_a_writer_error_on_a_full_filesystem(tmp_path, monkeypatch):
    import errno

    from mmpt.engine import checkpoint_integrity

    path = tmp_path / "x.pt"
    what, full = checkpoint_integrity.describe_write_failure(OSError(errno.EDQUOT, "quota"), path)
    assert full and what.startswith(f"disk full writing {path} ({os.strerror(errno.EDQUOT)}; ")
    assert what.endswith(" MB free there)")
    what, full = checkpoint_integrity.describe_write_failure(OSError(errno.EACCES, "denied"), path)
    assert not full and what.startswith(f"write failed writing {path} ({os.strerror(errno.EACCES)}; ")
    writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1920 vs 1814\nmore")
    what, full = checkpoint_integrity.describe_write_failure(writer, path)  # this disk has room: torch's words
    assert not full and what.startswith(f"write failed writing {path} ([enforce fail at inline_container.cc:672] . "
                                        "unexpected pos 1920 vs 1814; ")
    monkeypatch.setattr(checkpoint_integrity, "free_bytes", lambda _: 4096)  # the same error with 4 KB left
    assert checkpoint_integrity.describe_write_failure(writer, path) == (
        f"disk full writing {path} (no space left on device; 0.0 MB free there)", True)


# ---- reading: incomplete and corrupt tags, in one line ---------------------------------------------------------
def write_tag(root: Path, step: int, value: float = 1.0, complete: bool = True, listed: bool = True) -> Path:
    """A stage-0 tag the way save() leaves it: state file, marker with (or, like older mmpt, without) the manifest."""
    tag = root / "checkpoints" / tag_for(step)
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((64, 64), value)}}, tag / STATES)
    if complete:
        marker = {"step": step, "world_size": 1, "zero_stage": 0, **({"files": manifest(tag)} if listed else {})}
        (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    return tag


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_incomplete_and_corrupt_tags_are_named_with_what_is_wrong(tmp_path):
    good, bad = write_tag(tmp_path, 1), write_tag(tmp_path, 2)
    assert tag_problem(good) is None and resolve_checkpoint_dir(tmp_path) == bad
    size = (bad / STATES).stat().st_size
    truncate(bad / STATES)
    assert tag_problem(bad) == f"is corrupt: {STATES} has 100 bytes, the save wrote {size} (truncated or overwritten)"
    (bad / STATES).unlink()
    assert tag_problem(bad) == f"is corrupt: {STATES} is missing (the save wrote {size} bytes)"
    legacy = write_tag(tmp_path, 3, listed=False)  # a marker without a manifest: the zip directory still tells
    truncate(legacy / STATES)
    assert tag_problem(legacy).startswith(f"is corrupt: {STATES} is truncated or damaged (")
    (legacy / STATES).write_bytes(b"")
    assert tag_problem(legacy) == f"is corrupt: {STATES} is empty"
    partial = write_tag(tmp_path, 4, complete=False)
    assert tag_problem(partial).startswith("is incomplete: it has no `complete` marker")
    assert latest_checkpoint(tmp_path / "checkpoints") == legacy  # the incomplete one is no candidate at all
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint_dir(partial)
    assert str(err.value) == (f"checkpoint {partial} is incomplete: it has no `complete` marker, so its save never "
                              "finished (killed, out of space, or still being written); use another one, e.g. "
                              f"{good}, or delete {partial}")


def test_readers_ignore_staging_and_trash_dirs_and_odd_names(tmp_path):
    write_tag(tmp_path, 1)
    ckpts = tmp_path / "checkpoints"
    for hidden in (f".tmp-{tag_for(5)}-123/{tag_for(5)}", f".trash-{tag_for(6)}-9"):
        (ckpts / hidden).mkdir(parents=True)
        (ckpts / hidden / COMPLETE_MARKER).write_text("{}")
    (ckpts / f"{tag_for(7)}.bak").mkdir()
    (ckpts / f"{tag_for(7)}.bak" / COMPLETE_MARKER).write_text("{}")
    assert [p.name for p in complete_checkpoints(ckpts)] == [tag_for(1)]
    assert resume_target("auto", ckpts).name == tag_for(1)
    assert sorted(p.name for p in remove_stale_saves(ckpts)) == [f".tmp-{tag_for(5)}-123", f".trash-{tag_for(6)}-9"]
    assert sorted(p.name for p in ckpts.iterdir()) == [tag_for(1), f"{tag_for(7)}.bak"]


def test_resume_auto_stops_on_a_corrupt_newest_tag_instead_of_going_back_silently(tmp_path, capsys):
    first = write_tag(tmp_path, 10)
    newest = write_tag(tmp_path, 20)
    truncate(newest / STATES)
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(SystemExit) as exit_code:  # the trainer runs under mmpt-train's user_errors_exit
        user_errors_exit(resume_target)("auto", ckpts)
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: checkpoint {newest} is corrupt: {STATES} has 100 bytes, the save wrote ")
    assert err.rstrip().endswith(f"trainer.resume=auto will not skip it: resume from an earlier one with "
                                 f"trainer.resume={first}, or move {newest} away")
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} is corrupt: .*; use another one, e.g. {first}"):
        resume_target(str(newest), ckpts)  # trainer.resume=<that tag>
    assert resume_target(str(first), ckpts) == first


def test_mmpt_eval_refuses_an_incomplete_or_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    from mmpt.cli.evaluate import evaluate

    partial = write_tag(tmp_path / "a", 5, complete=False)
    corrupt = write_tag(tmp_path / "b", 5)
    truncate(corrupt / STATES)
    for ckpt, words in ((partial, "is incomplete: it has no `complete` marker"),
                        (corrupt, f"is corrupt: {STATES} has 100 bytes"),
                        (tmp_path / "a", f"no complete checkpoint in {tmp_path / 'a'}")):
        with pytest.raises(SystemExit) as exit_code:
            evaluate([f"ckpt={ckpt}"])
        err = capsys.readouterr().err
        assert exit_code.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert f"{tag_for(5)} never finished saving" in err  # a run dir whose only tag is half-written says so


def test_init_checkpoint_refuses_an_incomplete_or_corrupt_tag_before_launch(tmp_path):
    partial = write_tag(tmp_path / "a", 5, complete=False)
    corrupt = write_tag(tmp_path / "b", 5)
    truncate(corrupt / STATES)
    for source, words in ((partial, f"checkpoint {partial} is incomplete"),
                          (tmp_path / "b", f"checkpoint {corrupt} is corrupt: {STATES} has 100 bytes")):
        cfg = TrainConfig(model=CLIPConfig(init=InitConfig(checkpoint=str(source))))
        with pytest.raises(ConfigError, match=words):
            check_model_setup(cfg, torch.nn.Module())
        with pytest.raises(CheckpointError):
            init_checkpoint_source(source)
