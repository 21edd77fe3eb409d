"""model.freeze / model.train (mmpt/models/freezing.py), model.init.checkpoint (stage chaining), the trainable /
frozen counts, and frozen parameters through a real DeepSpeed ZeRO-2 engine and its checkpoints."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mmpt.cli.common import CONF_DIR
from mmpt.engine.checkpoint import COMPLETE_MARKER, load_model_weights, read_init_checkpoint
from mmpt.engine.config import ConfigError, TrainConfig, typed_config
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.optim import param_groups
from mmpt.engine.run_setup import check_model_setup, validate
from mmpt.tools.wandb_offline import find_offline_runs, read_offline_run
from mmpt.models.albef_config import ALBEFConfig
from mmpt.models.clip import CLIPConfig
from mmpt.models.freezing import ParamCounts, apply_freeze, parameter_counts
from mmpt.models.pretrained import InitConfig, apply_init
from mmpt.models.registry import build_model
from tests.dist_helpers import free_port, spawn

W, VOCAB, L = 32, 64, 8
# Tiny CLIP (width 32, 2 + 2 layers, 32 px / 8 px patches) by hand: its vision tower is
#   patch embed: cls 32 + pos 17*32 + conv 32*3*8*8 + bias 32                 =  6752
#   per block:   norm1 64 + qkv 96*32+96 + proj 32*32+32 + norm2 64 + fc1 128*32+128 + fc2 32*128+32 = 12704
#   final norm:  64                                                           -> 6752 + 2*12704 + 64 = 32224
VISUAL_NUMEL = 32224
PROJ_NUMEL = W * W  # vision_proj / text_proj: bias-free 32 x 32


def tiny_clip(seed: int = 0, embed_dim: int = W) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CLIPConfig(vision={"image_size": 32, "patch_size": 8, "width": W},  # type: ignore[arg-type]
                                  text={"width": W, "vocab_size": VOCAB, "max_text_len": L},
                                  contrastive={"embed_dim": embed_dim}))


def tiny_albef(seed: int = 0) -> torch.nn.Module:
    """ALBEF with its momentum teacher (the tiny preset has it off): 1 text + 1 fusion layer, 32 px."""
    torch.manual_seed(seed)
    return build_model(ALBEFConfig(vision={"image_size": 32, "width": W},  # type: ignore[arg-type]
                                   text={"width": W, "layers": 1, "vocab_size": VOCAB, "max_text_len": L},
                                   contrastive={"embed_dim": W}, momentum={"enabled": True, "queue_size": 16}))


def frozen_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def numel(model: torch.nn.Module, names: set[str]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


# ---- pattern semantics ---------------------------------------------------------------------------------------
def test_freeze_list_turns_off_exactly_the_matches_and_counts_them() -> None:
    model = tiny_clip()
    names = [n for n, _ in model.named_parameters()]
    counts = apply_freeze(model, freeze=["visual.*", "itc.logit_scale"])
    assert frozen_names(model) == {n for n in names if n.startswith("visual.") or n == "itc.logit_scale"}
    total = sum(p.numel() for p in model.parameters())
    assert counts == ParamCounts(trainable=total - VISUAL_NUMEL - 1, frozen=VISUAL_NUMEL + 1, teacher=0)


def test_train_list_keeps_only_its_matches() -> None:
    model = tiny_clip()
    counts = apply_freeze(model, train=["vision_proj.*", "text_proj.*"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vision_proj.proj.weight", "text_proj.proj.weight"}
    assert counts.trainable == 2 * PROJ_NUMEL


def test_train_and_freeze_combine_and_star_crosses_dots() -> None:
    model = tiny_clip()
    apply_freeze(model, train=["text.*"], freeze=["text.embed.*", "text.transformer.blocks.?.attn.*"])
    want = {n for n, _ in model.named_parameters()
            if n.startswith("text.") and not n.startswith("text.embed.") and ".attn." not in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert "text.transformer.blocks.1.mlp.fc1.weight" in want and "text.norm.weight" in want


def test_no_patterns_changes_nothing() -> None:
    model = tiny_clip()
    counts = apply_freeze(model)
    assert not frozen_names(model) and counts.frozen == 0 and counts.trainable == sum(p.numel() for p in model.parameters())


def test_momentum_teacher_is_never_unfrozen_and_counts_as_frozen() -> None:
    model = tiny_albef()
    teacher = {n for n, _ in model.named_parameters() if n.startswith("teacher.")}
    assert teacher and frozen_names(model) == teacher  # the model froze it itself
    student = {n for n, _ in model.named_parameters()} - teacher
    assert parameter_counts(model) == ParamCounts(numel(model, student), numel(model, teacher), numel(model, teacher))
    counts = apply_freeze(model, train=["*"])  # matches the teacher too: it must stay frozen
    assert frozen_names(model) == teacher
    assert counts.frozen == counts.teacher == numel(model, teacher)
    assert "momentum teacher" in counts.summary()

    model = tiny_albef()
    apply_freeze(model, freeze=["visual.*"])
    assert frozen_names(model) == teacher | {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    with pytest.raises(ValueError, match=r"'teacher\.\*' matches only parameters the model keeps frozen itself"):
        apply_freeze(tiny_albef(), train=["teacher.*"])


def test_unmatched_pattern_is_an_error_with_real_names_and_changes_nothing() -> None:
    model = tiny_clip()
    with pytest.raises(ValueError) as err:
        apply_freeze(model, freeze=["text.*", "vision.*"], train=["visual.blocks.*"])
    msg = str(err.value)
    assert "model.freeze pattern 'vision.*' matches no parameter" in msg and "'visual.*'" in msg
    assert "model.train pattern 'visual.blocks.*' matches no parameter" in msg
    assert "'visual.transformer.blocks.*'" in msg
    assert "Top-level names: itc.*, text.*, text_proj.*, vision_proj.*, visual.*." in msg
    assert "'text.*'" not in msg.split("Did you mean")[0]  # a pattern that matches is not reported
    assert not frozen_names(model)  # checked before anything is frozen


@pytest.mark.parametrize("train, freeze", [([], ["*"]), (["vision_proj.*"], ["vision_proj.*"])])
def test_freezing_everything_is_refused(train: list[str], freeze: list[str]) -> None:
    model = tiny_clip()
    with pytest.raises(ValueError, match="freeze every parameter: nothing would train"):
        apply_freeze(model, train=train, freeze=freeze)
    assert not frozen_names(model)


def test_summary_line_has_counts_and_percentages() -> None:
    line = ParamCounts(trainable=750_000, frozen=250_000, teacher=100_000).summary()
    assert line == "params 1.00M | trainable 0.75M (75.0%) | frozen 0.25M (25.0%, momentum teacher 0.10M)"
    assert "teacher" not in ParamCounts(trainable=1, frozen=0).summary()


def test_optimizer_groups_hold_only_trainable_parameters_and_no_empty_group() -> None:
    model = tiny_clip()
    apply_freeze(model, freeze=["visual.*"])
    groups = param_groups(model, 0.1)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    model = tiny_clip()
    apply_freeze(model, train=["vision_proj.*", "text_proj.*"])  # only matrices: the no-decay group would be empty
    groups = param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1 and len(groups[0]["params"]) == 2


# ---- validation before launch ----------------------------------------------------------------------------------
SINGLE = DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_validate_applies_patterns_to_the_meta_model_and_rejects_typos(demo_env) -> None:
    prep = validate(composed(["experiment=clip_tiny", "model.freeze=[visual.*]"]), SINGLE)
    with torch.device("meta"):
        probe = build_model(prep.cfg.model)
    visual = sum(p.numel() for n, p in probe.named_parameters() if n.startswith("visual."))
    assert prep.frozen_params == visual and prep.trainable_params == sum(p.numel() for p in probe.parameters()) - visual
    hint = r"'vision\.\*' matches no parameter\. Did you mean 'vision_proj\.\*' or 'visual\.\*'"
    with pytest.raises(ConfigError, match=hint):
        validate(composed(["experiment=clip_tiny", "model.freeze=[vision.*]"]), SINGLE)
    with pytest.raises(ConfigError, match="nothing would train"):
        validate(composed(["experiment=clip_tiny", "model.train=[visual.*]", "model.freeze=[visual.*]"]), SINGLE)


def test_missing_or_wrong_init_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    def cfg(path: Path) -> TrainConfig:
        return TrainConfig(model=CLIPConfig(init=InitConfig(checkpoint=str(path))))

    probe = tiny_clip()
    with pytest.raises(ConfigError, match=r"model.init.checkpoint='.*nope' does not exist; give an mmpt run dir"):
        check_model_setup(cfg(tmp_path / "nope"), probe)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match=r"is not a state-dict file \(\.pt"):
        check_model_setup(cfg(tmp_path / "config.yaml"), probe)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        check_model_setup(cfg(tmp_path), probe)  # a directory without any complete step_* tag
    check_model_setup(cfg(tmp_path / "nope"), probe, need_train=False)  # eval takes weights from its checkpoint


# ---- model.init.checkpoint -------------------------------------------------------------------------------------
def save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_init_checkpoint_file_loads_by_name_and_reports_missing_and_unexpected(tmp_path, caplog, suffix) -> None:
    src, dst = tiny_clip(seed=1), tiny_clip(seed=2)
    sd = {k: v.clone() for k, v in src.state_dict().items() if k != "text_proj.proj.weight"}
    sd["extra.weight"] = torch.ones(3)
    save_weights(sd, tmp_path / f"w{suffix}")
    kept = dst.text_proj.proj.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="mmpt"):
        reports = apply_init(dst, InitConfig(checkpoint=str(tmp_path / f"w{suffix}")), read_init_checkpoint)
    (report,) = reports
    assert len(report.mapped) == len(sd) - 1
    assert report.missing == ["text_proj.proj.weight"] and report.unexpected == ["extra.weight"]
    for key, value in dst.state_dict().items():
        torch.testing.assert_close(value, kept if key == "text_proj.proj.weight" else sd[key], rtol=0, atol=0, msg=key)
    log = caplog.text
    assert f"{len(sd) - 1} tensors mapped" in log and "missing: text_proj.proj.weight" in log
    assert "unexpected: extra.weight" in log and " -> " not in log  # counts, not a same-name mapping table


def test_init_checkpoint_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    torch.save(tiny_clip(seed=1, embed_dim=16).state_dict(), tmp_path / "w.pt")
    dst = tiny_clip(seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    want = r"shape mismatch for vision_proj\.proj\.weight: model \(32, 32\), checkpoint \(16, 32\)"
    with pytest.raises(ValueError, match=want):
        apply_init(dst, InitConfig(checkpoint=str(tmp_path / "w.pt")), read_init_checkpoint)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing half-written


def fake_tag(root: Path, step: int, sd: dict[str, torch.Tensor], complete: bool = True) -> Path:
    """A ZeRO-0 fp32 DeepSpeed tag as mmpt writes it (module states file + marker); the real engine's tag is
    checked in test_frozen_parameters_through_deepspeed_zero2."""
    tag = root / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    torch.save({"module": sd}, tag / "mp_rank_00_model_states.pt")
    if complete:
        (tag / COMPLETE_MARKER).write_text("{}")
    return tag


def test_init_checkpoint_resolves_run_dir_to_newest_complete_tag_and_accepts_a_tag_dir(tmp_path: Path) -> None:
    sds = [tiny_clip(seed=s).state_dict() for s in (1, 2, 3)]
    first = fake_tag(tmp_path, 10, sds[0])
    fake_tag(tmp_path, 20, sds[1])
    partial = fake_tag(tmp_path, 30, sds[2], complete=False)  # killed mid-save: never used
    for path, want in ((tmp_path, sds[1]), (tmp_path / "checkpoints", sds[1]), (first, sds[0])):
        got = read_init_checkpoint(str(path))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), path
    with pytest.raises(ConfigError, match=f"checkpoint {partial} is incomplete: it has no `complete` marker"):
        read_init_checkpoint(str(partial))


def test_teacher_comes_from_the_checkpoint_or_is_resynced_to_the_loaded_student(tmp_path: Path) -> None:
    src = tiny_albef(seed=1)
    with torch.no_grad():
        for p in src.teacher.parameters():
            p.add_(1.0)  # an EMA that differs from the student, as after training
    full = src.state_dict()
    torch.save(full, tmp_path / "full.pt")
    torch.save({k: v for k, v in full.items() if not k.startswith("teacher.")}, tmp_path / "student.pt")
    for name, teacher_source in (("full.pt", "teacher."), ("student.pt", "")):
        dst = tiny_albef(seed=2)
        apply_init(dst, InitConfig(checkpoint=str(tmp_path / name)), read_init_checkpoint)
        for key, value in dst.teacher.state_dict().items():  # teachers.<student attr>.<name>
            student_key = key.removeprefix("teachers.")
            want = full[f"teacher.{key}"] if teacher_source else full[student_key]
            torch.testing.assert_close(value, want, rtol=0, atol=0, msg=f"{name}: {key}")


# ---- a real DeepSpeed engine (ZeRO-2, single gloo process) ---------------------------------------------------
DS_CONFIG = {
    "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9, "wall_clock_breakdown": False,
}
FREEZE = ["visual.*", "text.embed.*"]


def _engine(seed: int):
    import deepspeed

    model = tiny_clip(seed=seed)
    apply_freeze(model, freeze=FREEZE)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    return engine, model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from mmpt.data.batch import Batch
    from mmpt.engine import checkpoint

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120), verbose=False)
    try:
        engine, model = _engine(seed=0)
        initial = _snapshot(model)
        optimised = {id(p) for group in engine.optimizer.bit16_groups for p in group}
        grads_of_frozen = []
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            ids = torch.randint(4, VOCAB, (4, L), generator=g)
            batch = Batch(images=torch.randn(4, 3, 32, 32, generator=g), input_ids=ids, attention_mask=torch.ones_like(ids))
            engine.backward(engine(batch).losses["itc"])
            grads_of_frozen += [p.grad is not None for p in model.parameters() if not p.requires_grad]
            engine.step()
        trained = _snapshot(model)
        run = Path(out_dir) / "run"
        checkpoint.save(engine, run / "checkpoints", 2, {"step": 2}, keep_last=1)
        fresh_engine, fresh = _engine(seed=7)  # another init: the checkpoint must restore the frozen ones too
        fresh_before = _snapshot(fresh)
        fresh_engine.load_checkpoint(str(run / "checkpoints"), tag="step_00000002")
        torch.save({
            "initial": initial, "trained": trained, "fresh_before": fresh_before, "fresh_after": _snapshot(fresh),
            "frozen": sorted(frozen_names(model)), "grads_of_frozen": grads_of_frozen,
            "frozen_optimised": any(id(p) in optimised for p in model.parameters() if not p.requires_grad),
            "trainable_optimised": all(id(p) in optimised for p in model.parameters() if p.requires_grad),
            "consolidated": checkpoint.read_init_checkpoint(str(run)),
        }, Path(out_dir) / "result.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_frozen_parameters_through_deepspeed_zero2(tmp_path: Path) -> None:
    spawn(_worker, (free_port(), str(tmp_path)), nprocs=1)
    r = torch.load(tmp_path / "result.pt", weights_only=False)
    frozen = set(r["frozen"])
    assert frozen == {n for n in r["initial"] if n.startswith(("visual.", "text.embed."))}
    assert not r["frozen_optimised"] and r["trainable_optimised"]  # ZeRO partitions hold trainable params only
    assert r["grads_of_frozen"] and not any(r["grads_of_frozen"])  # no gradient ever reached a frozen param
    for name, value in r["trained"].items():
        if name in frozen:  # bit-identical after two real optimizer steps
            assert torch.equal(value, r["initial"][name]), name
        elif name != "itc.logit_scale":
            assert not torch.equal(value, r["initial"][name]), f"{name} did not train"
    frozen_matrices = [n for n in frozen if r["initial"][n].ndim >= 2]  # biases/norms start equal anyway
    assert frozen_matrices and not any(torch.equal(r["fresh_before"][n], r["initial"][n]) for n in frozen_matrices)
    for name, value in r["trained"].items():
        assert torch.equal(r["fresh_after"][name], value), f"{name} not restored by load_checkpoint"
        assert torch.equal(r["consolidated"][name], value), f"{name} not in the consolidated export"


# ---- the CLI: stage chaining from a state dict, frozen tower, the start line ----------------------------------
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_cli_stage_from_checkpoint_with_frozen_tower_logs_counts(demo_env, tmp_path: Path) -> None:
    overrides = ["experiment=clip_tiny", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
                 "trainer.max_steps=2", "trainer.log_every=1", "trainer.save_every=2", "eval.at_end=false",
                 "deepspeed=zero1", "model.freeze=[visual.*]"]
    cfg = typed_config(composed(overrides))
    torch.manual_seed(123)
    previous = build_model(cfg.model).state_dict()  # "the previous stage": a different init than the run's seed
    torch.save(previous, tmp_path / "stage1.pt")
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(BIN / "mmpt-train"), *overrides, f"model.init.checkpoint={tmp_path / 'stage1.pt'}",
                           f"hydra.run.dir={run_dir}"], env=demo_env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]

    visual = sum(v.numel() for k, v in previous.items() if k.startswith("visual."))
    total = sum(p.numel() for p in build_model(cfg.model).parameters())
    line = re.search(r"params ([\d.]+)M \| trainable ([\d.]+)M \(([\d.]+)%\) \| frozen ([\d.]+)M \(([\d.]+)%\)", out)
    assert line, out[-3000:]
    assert [float(x) for x in line.groups()] == [round(total / 1e6, 2), round((total - visual) / 1e6, 2),
                                                 round(100 * (total - visual) / total, 1), round(visual / 1e6, 2),
                                                 round(100 * visual / total, 1)]
    assert f"pretrained model from {tmp_path / 'stage1.pt'}: {len(previous)} tensors mapped" in out
    assert re.search(r"\s0 missing \(left", out) and re.search(r"\s0 unexpected \(not", out)
    (wandb_run,) = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert wandb_run.config["params"] == {"trainable": total - visual, "frozen": visual, "teacher": 0}

    final = load_model_weights(run_dir / "checkpoints" / "step_00000002")  # ZeRO-1: zero_to_fp32 drops frozen params
    for key, value in previous.items():
        if key.startswith("visual."):  # loaded from the previous stage, then frozen through training and saving
            assert torch.equal(final[key], value.float()), key
    assert not torch.equal(final["text_proj.proj.weight"], previous["text_proj.proj.weight"])  # the rest trained
