"""Momentum teacher: EMA math, frozen/eval/not optimised, bf16 shadow, and a real DeepSpeed ZeRO-2 save/load."""
from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpt.engine.optim import param_groups
from mmpt.models.momentum import MomentumTeacher, assert_supported
from tests.dist_helpers import free_port, spawn


class Scaled(nn.Module):
    """A submodule with a float buffer, to check that buffers follow the student."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("gain", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.lin(x))
        return out * self.gain.to(out.dtype)  # DeepSpeed bf16 keeps buffers in fp32


class Toy(nn.Module):
    """Student encoder + projection, their momentum copies, and a distillation-style loss."""

    def __init__(self, momentum: float = 0.5) -> None:
        super().__init__()
        self.encoder = Scaled()
        self.proj = nn.Linear(8, 3)
        self.momentum = MomentumTeacher({"encoder": self.encoder, "proj": self.proj}, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.momentum["proj"](self.momentum["encoder"](x))
        out = self.proj(self.encoder(x))
        return ((out - target) ** 2).mean() + out.pow(2).mean()


def teacher_tensors(model: Toy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.momentum.state_dict().items()}


def student_tensors(model: Toy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("momentum.")}


def test_ema_matches_hand_computation_and_copies_buffers() -> None:
    torch.manual_seed(0)
    model = Toy(momentum=0.9).double()
    t0 = model.momentum["proj"].weight.detach().clone()
    for step in range(2):
        with torch.no_grad():
            model.proj.weight.add_(1.0 + step)
            model.encoder.gain.mul_(3.0)
        s = model.proj.weight.detach().clone()
        model.momentum.update()
        t0 = 0.9 * t0 + 0.1 * s  # teacher = m * teacher + (1 - m) * student
        torch.testing.assert_close(model.momentum["proj"].weight, t0, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.momentum["encoder"].gain, model.encoder.gain)
    model.momentum.update(momentum=0.0)  # m = 0: an exact copy
    for (name, t), (_, s) in zip(model.momentum["encoder"].named_parameters(), model.encoder.named_parameters()):
        torch.testing.assert_close(t, s, rtol=0, atol=0, msg=name)


def test_frozen_eval_not_optimised_and_saved_once() -> None:
    model = Toy()
    model.train()
    teacher_params = list(model.momentum.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert not model.momentum["encoder"].training and model.encoder.training
    optimised = {id(p) for group in param_groups(model, 0.02) for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in teacher_params)
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    keys = list(model.state_dict())
    assert "momentum.teachers.encoder.lin.weight" in keys and "momentum.teachers.encoder.gain" in keys
    assert keys.count("encoder.lin.weight") == 1 and not any(k.startswith("momentum._students") for k in keys)
    assert len(keys) == 2 * len(student_tensors(model))
    loss = model(torch.randn(2, 4))
    loss.backward()
    assert all(p.grad is None for p in teacher_params)
    with pytest.raises(TypeError, match="container"):
        model.momentum(torch.zeros(1))


def test_bf16_teacher_uses_fp32_shadow_and_load_resets_it() -> None:
    model = Toy(momentum=0.995).to(torch.bfloat16)  # what DeepSpeed bf16 does to every parameter
    with torch.no_grad():
        for p in model.proj.parameters():
            p.fill_(1.0)
        for p in model.momentum["proj"].parameters():
            p.fill_(0.5)
    naive = model.momentum["proj"].weight.detach().clone()
    for _ in range(600):
        torch._foreach_lerp_([naive], [model.proj.weight.detach()], 0.005)
        model.momentum.update()
    # A plain bf16 EMA stalls once 0.005 * |student - teacher| drops below half an ulp of the teacher...
    assert (naive.float() < 0.62).all()
    want = 1.0 - 0.5 * 0.995**600  # ...the fp32 EMA reaches 0.975
    torch.testing.assert_close(model.momentum["proj"].weight.float(), torch.full((3, 8), want), rtol=0, atol=4e-3)

    state = model.momentum.state_dict()
    state["teachers.proj.weight"] = torch.zeros(3, 8, dtype=torch.bfloat16)
    model.load_state_dict({f"momentum.{k}": v for k, v in state.items()} | student_tensors(model))
    model.momentum.update()  # must start from the loaded weights, not the stale shadow
    torch.testing.assert_close(model.momentum["proj"].weight.float(), torch.full((3, 8), 0.005), rtol=0.01, atol=0)


def test_zero3_is_refused_with_a_clear_message() -> None:
    for stage in (0, 1, 2):
        assert_supported(stage)
    with pytest.raises(ValueError, match=r"stage 3 .*GatheredParameters.*zero2"):
        assert_supported(3)


def test_deepcopy_keeps_students_shared_with_the_copy() -> None:
    model = Toy()
    clone = copy.deepcopy(model)
    assert clone.momentum._students["proj"] is clone.proj


# ---- a real DeepSpeed engine: ZeRO-2, bf16, single process on gloo --------------------------------------

DS_CONFIG = {
    "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": True},
    "steps_per_print": 10**9, "wall_clock_breakdown": False,
}


def _engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = Toy(momentum=0.5)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=0.05)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    return engine, model


def _train(engine, model: Toy, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        engine.backward(engine(x))
        engine.step()
        model.momentum.update()  # after the optimizer step, outside forward


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from mmpt.engine.checkpoint import load_model_weights

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120), verbose=False)
    try:
        ckpt = Path(out_dir) / "ckpt"
        engine, model = _engine(seed=0)
        initial = teacher_tensors(model)
        optimised = {id(p) for group in engine.optimizer.bit16_groups for p in group}
        _train(engine, model, steps=3)
        saved_teacher, saved_student = teacher_tensors(model), student_tensors(model)
        engine.save_checkpoint(str(ckpt), tag="t")
        _train(engine, model, steps=2)
        moved = teacher_tensors(model)

        engine.load_checkpoint(str(ckpt), tag="t")  # same engine: a stale fp32 shadow must not survive
        reloaded, shadow_after_load = teacher_tensors(model), model.momentum._shadow
        student_reloaded = student_tensors(model)
        model.momentum.update()
        after_one_update = teacher_tensors(model)

        engine2, model2 = _engine(seed=1)  # a fresh process's model, different init: resume
        fresh_before = teacher_tensors(model2)
        engine2.load_checkpoint(str(ckpt), tag="t")
        module_keys = list(torch.load(ckpt / "t" / "mp_rank_00_model_states.pt", weights_only=False)["module"])
        torch.save({
            "initial": initial, "saved_teacher": saved_teacher, "saved_student": saved_student, "moved": moved,
            "reloaded": reloaded, "shadow_after_load": shadow_after_load, "student_reloaded": student_reloaded,
            "after_one_update": after_one_update, "fresh_before": fresh_before,
            "fresh_after": teacher_tensors(model2), "fresh_student": student_tensors(model2),
            "teacher_optimised": any(id(p) in optimised for p in model.momentum.parameters()),
            "student_optimised": all(id(p) in optimised for p in model.proj.parameters()),
            "teacher_dtype": model.momentum["proj"].weight.dtype,
            "module_keys": module_keys, "consolidated": load_model_weights(ckpt / "t"),
        }, Path(out_dir) / "result.pt")
    finally:
        dist.destroy_process_group()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def assert_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_deepspeed_zero2_checkpoint_saves_and_restores_the_teacher(tmp_path: Path) -> None:
    spawn(_worker, (free_port(), str(tmp_path)), nprocs=1)
    r = torch.load(tmp_path / "result.pt", weights_only=False)

    assert r["teacher_dtype"] == torch.bfloat16  # DeepSpeed cast it: the shadow path is the one exercised
    assert not r["teacher_optimised"] and r["student_optimised"]
    assert_differs(r["saved_teacher"], r["initial"])  # the EMA ran through the engine
    assert_differs(r["moved"], r["saved_teacher"])  # later steps changed it again
    assert_same(r["reloaded"], r["saved_teacher"])  # same-engine load restores it
    assert_same(r["student_reloaded"], r["saved_student"])
    assert r["shadow_after_load"] is None
    # The first update after a load starts from the loaded teacher: lerp(saved teacher, saved student, 0.5).
    for key, t in r["saved_teacher"].items():
        if key.endswith("gain"):
            continue
        s = r["saved_student"][key.removeprefix("teachers.")]
        want = (0.5 * t.float() + 0.5 * s.float()).to(torch.bfloat16)
        torch.testing.assert_close(r["after_one_update"][key], want, rtol=0, atol=1e-2, msg=key)

    assert_differs(r["fresh_before"], r["saved_teacher"])  # a different init...
    assert_same(r["fresh_after"], r["saved_teacher"])  # ...replaced by the checkpoint's teacher
    assert_same(r["fresh_student"], r["saved_student"])
    teacher_keys = [f"momentum.{k}" for k in r["saved_teacher"]]
    assert set(teacher_keys) <= set(r["module_keys"])  # frozen teacher in DeepSpeed's module state dict
    assert set(teacher_keys) <= set(r["consolidated"])  # and in the consolidated fp32 export (eval path)
    for key in teacher_keys:  # zero_to_fp32 keeps frozen params in their saved dtype (bf16 here): values match
        want = r["saved_teacher"][key.removeprefix("momentum.")]
        torch.testing.assert_close(r["consolidated"][key].float(), want.float(), rtol=0, atol=0, msg=key)
