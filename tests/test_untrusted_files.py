"""A downloaded checkpoint cannot run code: a pickle payload planted in a model-states or ZeRO optimizer-state
file is refused by `mmpt.load`, `mmpt-eval`, `mmpt-export`, `model.init.checkpoint` and a resume from a foreign
path (the payload's marker file never appears, while a plain `torch.load(weights_only=False)` of the same file
does create it); a stored config's `pipe:` URL never runs; checkpoint files follow the user's umask."""
from __future__ import annotations

import json
import os
import shutil
import stat
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import mmpt
from mmpt.cli.evaluate import evaluate
from mmpt.cli.export import export
from mmpt.engine.checkpoint import complete_checkpoints, read_init_checkpoint
from mmpt.engine.checkpoint_integrity import COMPLETE_MARKER, manifest
from mmpt.engine.loggers import JsonlLog
from mmpt.engine.safe_load import UnsafeCheckpointError
from tests.saved_models import save_tag_dir

REFUSED = "never unpickles other objects"


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(file: Path, marker: Path) -> None:
    """Add a Payload to a (trusted, self-written) torch checkpoint file, and update the tag's `complete` manifest
    as an attacker would, so the file passes the size check and reaches the unpickler."""
    obj = torch.load(file, map_location="cpu", weights_only=False)
    obj["payload"] = Payload(marker)
    torch.save(obj, file)
    done = file.parent / COMPLETE_MARKER
    if done.is_file() and done.read_text().strip().startswith("{"):
        done.write_text(json.dumps({**json.loads(done.read_text()), "files": manifest(file.parent)}))


def assert_payload_is_live(file: Path, marker: Path) -> None:
    """The control: an ordinary unpickle of the planted file does run the command."""
    assert not marker.exists()
    torch.load(file, map_location="cpu", weights_only=False)
    assert marker.exists(), "the planted payload did not run under weights_only=False: the test proves nothing"
    marker.unlink()


def cli_error(fn, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_clean_export_follows_the_umask_and_planted_model_states_are_refused_by_every_reader(demo_env, tmp_path, capsys):
    tag, _ = save_tag_dir(tmp_path / "run", "clip")
    # before the plant: the export's writers (safetensors, yaml, json, model card) and metrics.jsonl take the
    # user's umask, however strict
    old = os.umask(0o077)
    try:
        out = export([str(tag), "--out", str(tmp_path / "clean")])
        JsonlLog(tmp_path / "metrics.jsonl").write({"step": 1})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir(), tmp_path / "metrics.jsonl"]}
    assert modes == {"clean": 0o700, **dict.fromkeys(["README.md", "config.yaml", "export.json", "model.safetensors",
                                                      "tokenizer.json", "metrics.jsonl"], 0o600)}
    marker = tmp_path / "PWNED"
    plant(tag / "mp_rank_00_model_states.pt", marker)
    eval_urls = f"data.eval.urls={demo_env['MMPT_DEMO_DIR']}/eval/00000.tar"

    with pytest.raises(UnsafeCheckpointError, match=REFUSED) as exc:
        mmpt.load(tmp_path / "run")
    assert "posix.system" in str(exc.value) and "mp_rank_00_model_states.pt" in str(exc.value)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        read_init_checkpoint(str(tmp_path / "run"))  # model.init.checkpoint=<run dir>
    assert "posix.system" in cli_error(evaluate, [f"ckpt={tag}", eval_urls], capsys)
    assert REFUSED in cli_error(export, [str(tag), "--out", str(tmp_path / "export")], capsys)
    assert not (tmp_path / "export").exists()
    # a plain state-dict file as model.init.checkpoint (models/pretrained.py's reader)
    torch.save({"model": {"w": torch.zeros(2)}, "args": Payload(marker)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not loaded with weights_only=False"):
        read_init_checkpoint(str(tmp_path / "weights.pt"))
    assert not marker.exists()
    assert_payload_is_live(tag / "mp_rank_00_model_states.pt", marker)


def test_stored_pipe_urls_and_output_paths_are_not_used(demo_env, tmp_path, capsys):
    tag, _ = save_tag_dir(tmp_path / "run", "clip")
    marker, zs_marker, overwritten = tmp_path / "PWNED", tmp_path / "PWNED_ZEROSHOT", tmp_path / "overwritten.txt"
    shard = f"{demo_env['MMPT_DEMO_DIR']}/eval/00000.tar"
    pipe = f"pipe:touch {marker} && cat {shard}"
    cfg = OmegaConf.load(tag / "config.yaml")
    cfg.data.eval.urls = pipe
    cfg.eval.output = str(overwritten)
    cfg.eval.zeroshot.urls = f"pipe:touch {zs_marker} && cat {shard}"
    OmegaConf.save(cfg, tag / "config.yaml")

    err = cli_error(evaluate, [f"ckpt={tag}"], capsys)
    assert "data.eval.urls is not set" in err and "never takes them from the checkpoint's config.yaml" in err
    loaded = mmpt.load(tag)  # mmpt.load reads no data: the stored urls stay inert text
    loaded.encode_text(["a red circle"])
    assert not marker.exists() and not zs_marker.exists() and not overwritten.exists()
    # the same URL from the user's command line is the user's choice, and runs (the payload is live); the
    # stored zero-shot URL and output path stay unused in that successful evaluation too
    metrics = evaluate([f"ckpt={tag}", f"data.eval.urls='{pipe}'"])
    assert metrics["retrieval/num_pairs"] == 16 and marker.exists()
    assert not zs_marker.exists() and not overwritten.exists() and not any(k.startswith("zeroshot") for k in metrics)


# ---- a real DeepSpeed ZeRO-2 checkpoint (one gloo rank): optimizer-state records, resume from a foreign path --
DS_CONFIG = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
             "steps_per_print": 10**9, "wall_clock_breakdown": False}
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def zero_checkpoint_round(out: Path) -> dict:
    """In this process, on a one-rank gloo group, under umask 022: train one step, save through mmpt's
    checkpoint.save, then resume three ways: from a clean copy elsewhere (weights-only), from that copy with a
    planted payload (refused), from its own dir (fully unpickled, as before)."""
    import deepspeed

    from mmpt.engine import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      config=DS_CONFIG)
    engine.backward(engine(torch.randn(4, 8)).square().mean())
    engine.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    own = out / "run" / "checkpoints"
    tag = checkpoint.save(engine, own, 1, {"step": 1}, keep_last=2, extra_files={"config.yaml": "a: 1\n"})
    JsonlLog(out / "run" / "metrics.jsonl").write({"step": 1})
    foreign = out / "downloaded" / "checkpoints"
    shutil.copytree(own, foreign)

    def resume(tag_dir: Path) -> bool:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        state = checkpoint.load(engine, tag_dir, own)
        return state["step"] == 1 and all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())

    result = {"foreign_restored": resume(foreign / tag.name), "trained": trained}
    plant(foreign / tag.name / OPTIM_STATES, out / "PWNED")
    with pytest.raises(UnsafeCheckpointError) as refused:
        checkpoint.load(engine, foreign / tag.name, own)
    result["refused"] = str(refused.value)
    result["own_restored"] = resume(tag)
    return result


@pytest.mark.slow
def test_zero_checkpoint_payload_refused_foreign_resume_weights_only_and_files_follow_the_umask(tmp_path, monkeypatch):
    import torch.distributed as dist

    from tests.dist_helpers import free_port

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    old = os.umask(0o022)
    try:
        r = zero_checkpoint_round(tmp_path)
    finally:
        os.umask(old)
        dist.destroy_process_group()
    marker, tag = tmp_path / "PWNED", complete_checkpoints(tmp_path / "downloaded" / "checkpoints")[-1]
    # a clean checkpoint from elsewhere resumes through the weights-only reader (DeepSpeed's records allowed)
    assert r["foreign_restored"] and r["own_restored"]
    assert REFUSED in r["refused"] and "posix.system" in r["refused"] and OPTIM_STATES in r["refused"]
    assert "hydra.run.dir" in r["refused"] and "trainer.resume=auto" in r["refused"]
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        read_init_checkpoint(str(tag))  # model.init.checkpoint / mmpt.load / mmpt-export / mmpt-eval: one reader
    assert not marker.exists()
    assert_payload_is_live(tag / OPTIM_STATES, marker)
    # the clean ZeRO checkpoint consolidates, weights-only, to exactly the trained weights
    weights = read_init_checkpoint(str(tmp_path / "run"))
    assert set(weights) == set(r["trained"]) and all(torch.equal(weights[k], v) for k, v in r["trained"].items())
    # every file DeepSpeed, torch.save and mmpt wrote under umask 022: nothing group- or world-writable
    paths = [tmp_path / "run", *(tmp_path / "run").rglob("*")]
    assert {"metrics.jsonl", "config.yaml", "complete", OPTIM_STATES, "mp_rank_00_model_states.pt",
            "rng_rank00000.pt"} <= {p.name for p in paths}
    assert not [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & (stat.S_IWOTH | stat.S_IWGRP)]
