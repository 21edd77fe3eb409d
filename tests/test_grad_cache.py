"""Contrastive gradient caching (trainer.contrastive_accum_steps): gradients and one optimizer step equal the
full-batch ones, dropout is replayed, and impossible combinations are refused before launch."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from mmpt.cli.common import CONF_DIR
from mmpt.data.batch import Batch
from mmpt.engine.config import ConfigError
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.ds_config import build_deepspeed_config
from mmpt.engine.grad_cache import cached_step
from mmpt.engine.run_setup import validate
from mmpt.models.registry import build_model, preset_config
from tests.dist_helpers import run_ranks

VOCAB, L, IMAGE = 64, 12, 32


def tiny_clip(dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """Two 32-wide blocks per tower, 32 px; duplicate captions / image ids count as positives (codes exercised)."""
    torch.manual_seed(seed)
    cfg = preset_config("clip", "tiny", vision={"image_size": IMAGE, "patch_size": 8, "width": 32, "heads": 2,
                                                "dropout": dropout},
                        text={"width": 32, "heads": 2, "vocab_size": VOCAB, "max_text_len": L, "dropout": dropout},
                        contrastive={"embed_dim": 16, "duplicate_positives": True})
    return build_model(cfg).to(dtype)


def pairs(b: int, seed: int, dtype: torch.dtype = torch.float64) -> Batch:
    """Right-padded captions of varied length; image ids repeat within and across micro-batches."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, L + 1, (b,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(5, VOCAB, (b, L), generator=g) * mask
    return Batch(images=torch.randn(b, 3, IMAGE, IMAGE, generator=g, dtype=dtype), input_ids=ids,
                 attention_mask=mask, image_ids=[f"img{(seed + i) % 4}" for i in range(b)])


def concat(batches: list[Batch]) -> Batch:
    """The same samples as one batch, in the same order."""
    return Batch(images=torch.cat([b.images for b in batches]), input_ids=torch.cat([b.input_ids for b in batches]),
                 attention_mask=torch.cat([b.attention_mask for b in batches]),
                 image_ids=[i for b in batches for i in b.image_ids])


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys() and "itc.logit_scale" in want  # every parameter, the temperature too
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def test_cached_gradients_equal_one_backward_of_the_full_batch_loss() -> None:
    """3 micro-batches of 3 (fp64, no DeepSpeed) vs one plain forward/backward over the 9 pairs, loss weight 0.5."""
    batches = [pairs(3, seed=s) for s in range(3)]
    full = tiny_clip()
    out = full(concat(batches))
    (0.5 * out.losses["itc"]).backward()
    cached = tiny_clip()
    got, total = cached_step(cached, batches, {"itc": 0.5}, cached.contrastive_features, torch.Tensor.backward)
    torch.testing.assert_close(got.losses["itc"], out.losses["itc"].detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(total, 0.5 * out.losses["itc"].detach(), rtol=0, atol=1e-12)
    assert got.metrics["itc_acc"] == out.metrics["itc_acc"]
    assert_same_grads(grads(cached), grads(full), atol=1e-10)


def test_the_re_forward_replays_each_micro_batch_dropout() -> None:
    """With dropout, the gradients equal those of the graph-keeping forward that drew the same masks (same seed,
    micro-batch by micro-batch); without the RNG replay the re-forward would draw new masks."""
    batches = [pairs(4, seed=s) for s in range(2)]
    reference = tiny_clip(dropout=0.3)
    torch.manual_seed(123)
    features = [reference.contrastive_features(b) for b in batches]
    image, text = (torch.cat(f) for f in zip(*features))
    reference.contrastive_loss(image, text, concat(batches)).losses["itc"].backward()
    want = grads(reference)

    cached = tiny_clip(dropout=0.3)
    torch.manual_seed(123)
    cached_step(cached, batches, {"itc": 1.0}, cached.contrastive_features, torch.Tensor.backward)
    assert_same_grads(grads(cached), want, atol=1e-10)

    other = tiny_clip(dropout=0.3)  # the masks matter: another draw gives other gradients
    torch.manual_seed(124)
    cached_step(other, batches, {"itc": 1.0}, other.contrastive_features, torch.Tensor.backward)
    assert max((g - want[n]).abs().max().item() for n, g in grads(other).items()) > 1e-3


# ---- one optimizer step through real DeepSpeed engines: 2 gloo ranks ------------------------------------------
B, N, WORLD, LR = 2, 2, 2, 0.01
CASES = ((0, 1), (1, 1), (2, 1), (1, 2))  # (ZeRO stage, trainer.grad_accum)


def _engine(stage: int, batch_size: int, cached: int, accum: int) -> Any:
    """The trainer's DeepSpeed config (batch sizes, gas) for data.batch_size, contrastive_accum_steps, grad_accum."""
    import deepspeed

    from mmpt.engine.config import TrainConfig

    cfg = TrainConfig(deepspeed={"zero_optimization": {"stage": stage}})
    cfg.data.batch_size, cfg.trainer.grad_clip = batch_size, 0.0
    cfg.trainer.contrastive_accum_steps, cfg.trainer.grad_accum = cached, accum
    model = tiny_clip(dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # the update is lr x gradient: no Adam normalisation
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_deepspeed_config(cfg, WORLD))
    return engine


def _params(engine: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from mmpt.engine.grad_cache import GradCacheAccumulator
    from mmpt.engine.trainer import micro_step

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120), verbose=False)
    try:
        result: dict[Any, Any] = {}
        for stage, accum in CASES:
            # this rank's samples: `accum` contrastive batches of N micro-batches of B pairs
            groups = [[pairs(B, seed=100 * rank + 10 * g + k, dtype=torch.float32) for k in range(N)]
                      for g in range(accum)]
            full = _engine(stage, batch_size=N * B, cached=1, accum=accum)
            initial = _params(full)
            for group in groups:  # the trainer's ordinary micro-steps, one per whole contrastive batch
                micro_step(full, concat(group), {"itc": 1.0})
            cached = _engine(stage, batch_size=B, cached=N, accum=accum)
            accumulator = GradCacheAccumulator(N)  # the trainer's GradCache path
            done = [accumulator.add(cached, batch, {"itc": 1.0}) for group in groups for batch in group]
            result[stage, accum] = {"initial": initial, "full": _params(full), "cached": _params(cached),
                                    "steps": (full.global_steps, cached.global_steps),
                                    "groups_done": [d is not None for d in done]}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_deepspeed_step_with_cached_micro_batches_equals_the_full_batch_step(tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches of 2 (GradCache) vs 2 ranks x 1 batch of 4, same samples and order: the
    parameters after one SGD step agree to 1e-5 (ZeRO-0, 1 and 2), and the step moved them; with
    trainer.grad_accum=2 the step averages two such contrastive batches, as two full-batch micro-steps do."""
    ranks = run_ranks(_worker, tmp_path, world=WORLD)
    for case in CASES:
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["steps"] == (1, 1)  # exactly one optimizer step each
        assert r0["groups_done"] == [False, True] * case[1]  # one contrastive loss per N micro-batches
        moved = max((r0["full"][n] - r0["initial"][n]).abs().max().item() for n in r0["full"])
        assert moved > 1e-3, moved
        for name, want in r0["full"].items():
            torch.testing.assert_close(r0["cached"][name], want, rtol=0, atol=1e-5, msg=f"{case} {name}")
            torch.testing.assert_close(r1["cached"][name], r0["cached"][name], rtol=0, atol=0, msg=name)


# ---- refusals before launch -------------------------------------------------------------------------------------
TWO = DistEnv(0, 0, 2, "127.0.0.1", 29500, "torchrun")


def composed(overrides: list[str]) -> Any:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_batch_sizes_count_the_cached_micro_batches(demo_env: dict[str, str]) -> None:
    prep = validate(composed(["data.batch_size=8", "trainer.contrastive_accum_steps=4", "trainer.global_batch_size=128",
                              "deepspeed=zero2"]), TWO)
    assert prep.cfg.trainer.grad_accum == 2  # 128 = 8 per micro-batch x 4 cached x 2 accumulated x 2 ranks
    ds = build_deepspeed_config(prep.cfg, world_size=2)
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_batch_size"] == 128
    assert ds["train_micro_batch_size_per_gpu"] == 8


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=albef/tiny"], "objectives ['itm', 'mlm'] are not a function of the per-pair embeddings; set "
                               "model.objectives=[itc], or trainer.contrastive_accum_steps=1"),
        (["model=coca/tiny"], "objectives ['caption'] are not a function"),
        (["model=albef/tiny", "model.objectives=[itc]", "model.momentum.enabled=true"],
         "cannot cache the momentum teacher's distillation (its queue enqueues every forward); set "
         "model.momentum.enabled=false"),
        (["deepspeed=zero3"], "does not support ZeRO-3"),
        (["data.batch_size=8", "trainer.global_batch_size=48"], "not divisible by data.batch_size x world size x "
                                                                "trainer.contrastive_accum_steps = 8 x 2 x 2 = 32"),
        (["trainer.contrastive_accum_steps=0"], "trainer.contrastive_accum_steps=0 must be positive"),
    ],
)
def test_what_cannot_be_cached_is_refused_with_the_fix(demo_env: dict[str, str], overrides: list[str],
                                                        expected: str) -> None:
    steps = [] if any(o.startswith("trainer.contrastive_accum_steps") for o in overrides) else [
        "trainer.contrastive_accum_steps=2"]
    with pytest.raises(ConfigError) as err:
        validate(composed(overrides + steps), TWO)
    assert expected in str(err.value)


@pytest.mark.parametrize("model", ["clip/tiny", "albef/tiny", "coca/tiny", "vlmo/tiny", "beit3/tiny"])
def test_contrastive_only_models_validate(demo_env: dict[str, str], model: str) -> None:
    objectives = [] if model == "clip/tiny" else ["model.objectives=[itc]"]
    extra = ["model.momentum.enabled=false"] if model == "albef/tiny" else []
    prep = validate(composed([f"model={model}", *objectives, *extra, "trainer.contrastive_accum_steps=2"]), TWO)
    assert prep.cfg.trainer.contrastive_accum_steps == 2
