"""One process: ZeRO-1/2 run as stage 0, mmpt clips in fp32 and reports the norm, no all-reduce with itself."""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from mmpt.engine.checkpoint import COMPLETE_MARKER, is_legacy_zero
from mmpt.engine.config import TrainConfig
from mmpt.engine.ds_config import build_deepspeed_config, mmpt_grad_clip
from tests.dist_helpers import run_ranks


def _cfg(zero: dict, precision: str = "fp32", clip: float = 1.0) -> TrainConfig:
    cfg = TrainConfig()
    cfg.deepspeed = {"zero_optimization": dict(zero)}
    cfg.trainer.precision, cfg.trainer.grad_clip = precision, clip
    return cfg


@pytest.mark.parametrize("stage", [1, 2])
def test_one_process_runs_zero_1_and_2_as_stage_0_and_mmpt_clips_in_fp32(stage):
    cfg = _cfg({"stage": stage, "overlap_comm": False, "reduce_scatter": True})
    ds = build_deepspeed_config(cfg, world_size=1)
    assert ds["zero_optimization"] == {"stage": 0} and "zero_allow_untested_optimizer" not in ds
    assert ds["gradient_clipping"] == 0.0 and mmpt_grad_clip(cfg, ds) == 1.0  # DeepSpeed must not clip twice


def test_stage_is_kept_with_two_ranks_offload_or_a_legacy_resume():
    two = build_deepspeed_config(_cfg({"stage": 2}), world_size=2)
    assert two["zero_optimization"]["stage"] == 2 and two["gradient_clipping"] == 1.0
    assert mmpt_grad_clip(_cfg({"stage": 2}), two) == 0.0  # ZeRO clips its own fp32 partitions
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert build_deepspeed_config(_cfg(offload), world_size=1)["zero_optimization"] == offload
    legacy = build_deepspeed_config(_cfg({"stage": 1}), world_size=1, keep_zero_stage=True)
    assert legacy["zero_optimization"]["stage"] == 1 and legacy["gradient_clipping"] == 1.0


def test_bf16_and_disabled_clipping_leave_clipping_to_deepspeed():
    bf16 = _cfg({"stage": 1}, precision="bf16")
    ds = build_deepspeed_config(bf16, world_size=1)
    assert ds["zero_optimization"]["stage"] == 0 and ds["gradient_clipping"] == 1.0 and mmpt_grad_clip(bf16, ds) == 0
    off = _cfg({"stage": 0}, clip=0.0)
    ds = build_deepspeed_config(off, world_size=1)
    assert ds["gradient_clipping"] == 0.0 and mmpt_grad_clip(off, ds) == 0.0


def test_legacy_zero_checkpoint_is_one_without_a_recorded_stage_but_with_partitions(tmp_path):
    tag = tmp_path / "step_00000004"
    tag.mkdir()
    (tag / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "world_size": 1}))
    assert not is_legacy_zero(tag) and not is_legacy_zero(None)  # stage 0 wrote no partition files
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert is_legacy_zero(tag)
    (tag / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 0}))
    assert not is_legacy_zero(tag)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from mmpt.engine.ds_config import skip_single_rank_allreduce
    from mmpt.engine.trainer import micro_step

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120), verbose=False)

    class Toy(torch.nn.Module):  # the protocol's forward: a batch in, an object with .losses out
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor):
            return type("Out", (), {"losses": {"a": self.lin(x).pow(2).mean(), "b": self.lin.weight.sum()}})()

    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    torch.manual_seed(0)
    bare = Toy()
    torch.manual_seed(0)
    model = Toy()
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=0.1)
    cfg = _cfg({"stage": 1}, clip=0.05)  # small enough that clipping bites every step
    cfg.data.batch_size = 2
    ds = build_deepspeed_config(cfg, world_size=1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                           config=ds)
    skip_single_rank_allreduce(engine, world_size=1)
    weights = {"a": 1.0, "b": 0.5}
    bare_norms, mmpt_norms = [], []
    for x in xs:
        out = bare(x)
        (out.losses["a"] + 0.5 * out.losses["b"]).backward()
        bare_norms.append(float(torch.nn.utils.clip_grad_norm_(bare.parameters(), 0.05)))
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        micro_step(engine, x, weights, mmpt_grad_clip(cfg, ds))
        mmpt_norms.append(float(engine.get_global_grad_norm()))
    torch.save({"stage": engine.zero_optimization_stage(), "allreduce": engine.enable_backward_allreduce,
                "bare": bare.state_dict(), "mmpt": model.state_dict(), "bare_norms": bare_norms,
                "mmpt_norms": mmpt_norms}, Path(out_dir) / "rank0.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_process_engine_step_equals_a_bare_clipped_adamw_loop(tmp_path):
    (got,) = run_ranks(_worker, tmp_path, world=1)
    assert got["stage"] == 0 and got["allreduce"] is False
    assert got["mmpt_norms"] == pytest.approx(got["bare_norms"], rel=1e-6) and min(got["bare_norms"]) > 0.05
    for name, value in got["bare"].items():
        torch.testing.assert_close(got["mmpt"][name], value, rtol=1e-6, atol=1e-7)
