"""bf16 at stage 0: mmpt's multi-tensor optimizer step equals DeepSpeed's own `FP16_UnfusedOptimizer.step`."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_ranks


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 3)
        self.unused = torch.nn.Parameter(torch.ones(4))  # no gradient: DeepSpeed steps it with a zero one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.lin(x))).float().pow(2).mean()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from mmpt.engine.bf16_step import use_foreach_bf16_step
    from mmpt.engine.config import OptimizerConfig, TrainConfig
    from mmpt.engine.ds_config import build_deepspeed_config, skip_single_rank_allreduce
    from mmpt.engine.optim import build_optimizer

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120), verbose=False)
    cfg = TrainConfig()
    cfg.trainer.precision, cfg.trainer.grad_clip, cfg.data.batch_size = "bf16", 0.05, 4  # clipping bites
    ds = build_deepspeed_config(cfg, world_size=1)
    results = {}
    for name in ("deepspeed", "mmpt"):
        torch.manual_seed(0)
        model = Toy()
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OptimizerConfig(lr=0.1)),
                                               config=ds)
        skip_single_rank_allreduce(engine, world_size=1)
        replaced = use_foreach_bf16_step(engine) if name == "mmpt" else False
        norms, applied = [], []
        for step in range(5):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).bfloat16()
            loss = engine(x)
            if step == 3:
                loss = loss * float("nan")  # a non-finite gradient: the step must be skipped
            engine.backward(loss)
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
            applied.append(bool(engine.was_step_applied()))
        results[name] = {"replaced": replaced, "norms": norms, "applied": applied,
                         "weights": {k: v.float().clone() for k, v in model.state_dict().items()},
                         "master": [p.detach().clone() for g in engine.optimizer.fp32_groups for p in g],
                         "moments": [s["exp_avg"].clone() for s in engine.optimizer.optimizer.state.values()],
                         "fp32_grads": [p.grad for g in engine.optimizer.fp32_groups for p in g]}
    torch.save(results, Path(out_dir) / "rank0.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_foreach_bf16_step_equals_deepspeeds_step_with_clipping_and_a_skip(tmp_path: Path) -> None:
    (got,) = run_ranks(_worker, tmp_path, world=1)
    ds, ours = got["deepspeed"], got["mmpt"]
    assert ours["replaced"] and not ds["replaced"]
    assert ds["applied"] == ours["applied"] == [True, True, True, False, True]
    assert ours["norms"][3] == float("inf") == ds["norms"][3]
    assert min(ds["norms"][:3]) > 0.05  # clipping was active
    assert ours["norms"] == pytest.approx(ds["norms"], rel=1e-6)
    for a, b in zip(ours["master"], ds["master"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours["moments"], ds["moments"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert ours["weights"].keys() == ds["weights"].keys()
    for name, value in ds["weights"].items():
        torch.testing.assert_close(ours["weights"][name], value, rtol=0, atol=0)  # the bf16 weights
    assert torch.equal(ours["weights"]["unused"], torch.ones(4))  # a zero gradient and no decay (1-d): unmoved
    assert all(g is None for g in ours["fp32_grads"] + ds["fp32_grads"])  # no fp32 gradient left behind
