"""`trainer.compile`: blocks compiled in place train like eager ones, through DeepSpeed, with the same parameters
and state-dict keys (momentum teacher included); bad backends and ZeRO-3 are refused before launch.

The training comparison uses the `aot_eager` backend: it captures the same graphs (Dynamo + AOTAutograd
forward/backward) as inductor but skips code generation, which costs minutes on this CPU (a cold inductor
compile of the tiny CLIP took ~2 min on 2 loaded cores); inductor itself is measured by
scripts/bench/bench_compile.py.
"""
from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from mmpt.engine.compile import compile_blocks
from mmpt.engine.config import ConfigError
from mmpt.models.registry import build_model, preset_config
from mmpt.modules.block import Block
from tests.dist_helpers import run_ranks
from tests.test_arch_contract import make_batch, tiny_config
from tests.test_config import SINGLE, composed

STEPS = 5


def _train(name: str, compiled: bool, out_dir: Path) -> dict:
    """5 ZeRO-2 steps of a tiny CLIP through the trainer's micro_step; losses, parameter ids, saved keys."""
    import deepspeed

    from mmpt.engine.config import OptimizerConfig, TrainConfig
    from mmpt.engine.ds_config import build_deepspeed_config
    from mmpt.engine.optim import build_optimizer
    from mmpt.engine.trainer import micro_step

    cfg = tiny_config("clip", ("itc",))
    if compiled:  # checkpointing recomputes compiled blocks in backward: both at once must still agree
        cfg = replace(cfg, activation_checkpointing=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    params, keys = {n: id(p) for n, p in model.named_parameters()}, list(model.state_dict())
    blocks = compile_blocks(model, "aot_eager") if compiled else 0
    train_cfg = TrainConfig()
    train_cfg.data.batch_size = 4
    train_cfg.deepspeed = {"zero_optimization": {"stage": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OptimizerConfig(lr=1e-3)),
                                           config=build_deepspeed_config(train_cfg, world_size=1))
    losses = []
    for step in range(STEPS):
        torch.manual_seed(step)
        _, total = micro_step(engine, make_batch(model, cfg, seed=step), {"itc": 1.0})
        losses.append(total.item())
    engine.save_checkpoint(str(out_dir / name), tag="t")
    saved = torch.load(out_dir / name / "t" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    same_params = params == {n: id(p) for n, p in model.named_parameters()}
    return {"losses": losses, "blocks": blocks, "same_params": same_params, "keys_before": keys, "saved_keys": list(saved)}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120), verbose=False)
    try:
        eager = _train("eager", False, Path(out_dir))
        compiled = _train("compiled", True, Path(out_dir))
        graphs = counters["stats"]["unique_graphs"]
        torch.save({"eager": eager, "compiled": compiled, "graphs": graphs}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_through_deepspeed_zero2(tmp_path: Path) -> None:
    (r,) = run_ranks(_worker, tmp_path, world=1)
    eager, compiled = r["eager"], r["compiled"]
    assert compiled["blocks"] == 4 and r["graphs"] >= 2  # 2 ViT + 2 text blocks; ViT and text graphs really built
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=0, atol=1e-4)
    assert len(set(eager["losses"])) == STEPS  # the steps trained: five different losses
    assert compiled["same_params"]  # compiled in place: the optimizer and ZeRO hold the model's own tensors
    assert compiled["saved_keys"] == eager["saved_keys"] == compiled["keys_before"]
    assert not [k for k in compiled["saved_keys"] if "_orig_mod" in k]


def test_compiling_albef_with_a_teacher_keeps_parameters_keys_and_the_ema() -> None:
    """Every block (the EMA teacher's copies too) is compiled in place: the model's parameters and state-dict
    keys are unchanged and the teacher still averages toward the student's own tensors."""
    cfg = preset_config("albef", "tiny", momentum={"enabled": True, "queue_size": 64})
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict(keep_vars=True)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert compile_blocks(model, "aot_eager") == len(blocks) == 2 * (2 + 2 + 2)  # ViT, text, fusion; x2 teacher
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is state[k] for k in state)
    teacher = model.teacher
    pairs = list(teacher._pairs())
    student_ids = {id(p) for n, p in model.named_parameters() if not n.startswith("teacher.")}
    assert pairs and all(id(s) in student_ids for _, s in pairs)
    t, s = pairs[0]
    with torch.no_grad():
        s.add_(1.0)
    before = t.detach().clone()
    teacher.update(0.5)
    torch.testing.assert_close(after[next(k for k in after if after[k] is t)], 0.5 * before + 0.5 * s.detach())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.compile=true", "trainer.compile_backend=turbo"],
         "trainer.compile_backend='turbo' is not valid; choose one of"),
        (["trainer.compile=true", "deepspeed=zero3"], "trainer.compile=true supports ZeRO stages 0-2"),
    ],
)
def test_compile_options_are_checked_before_launch(demo_env, overrides: list[str], expected: str) -> None:
    from mmpt.engine.run_setup import validate

    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate(composed(overrides), SINGLE)
    assert validate(composed(["trainer.compile=true", "deepspeed=zero2"]), SINGLE).cfg.trainer.compile is True
