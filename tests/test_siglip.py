"""SigLIP's chunked sigmoid loss against a plain dense B x B reference (float64), on one process and on 2 gloo
ranks (loss, feature / scale / bias / model-parameter gradients), and the refusals of impossible configs."""
from __future__ import annotations

import dataclasses
import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmpt.models.registry import build_model, preset_config
from mmpt.objectives.pair_codes import duplicate_mask
from mmpt.objectives.siglip import SigLipLoss
from tests.dist_helpers import run_ranks

TOL = dict(rtol=1e-6, atol=1e-9)


def dense_reference(img: torch.Tensor, txt: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor,
                    positives: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's loss written out: -(1/B) sum_i sum_j log sigmoid(z_ij (exp(t') x_i.y_j + b)), `B B` at once."""
    b = img.shape[0]
    positives = torch.eye(b, dtype=torch.bool) if positives is None else positives
    z = torch.where(positives, 1.0, -1.0).to(img.dtype)
    logits = t_prime.exp() * img @ txt.T + bias
    return -torch.log(torch.sigmoid(z * logits)).sum() / b


def _features(n: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, e, generator=gen, dtype=torch.float64), dim=-1)
    return img, txt


def _loss_module(scale: float = 3.0, bias: float = -1.5) -> SigLipLoss:
    """Not the paper's init (10, -10): there every negative's gradient is ~e^-10 and a test would see zeros."""
    return SigLipLoss(scale, bias).double()


def test_init_is_the_papers() -> None:
    loss = SigLipLoss()
    assert loss.logit_scale.shape == (1,) and loss.logit_bias.shape == (1,)
    assert loss.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss.logit_bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("with_codes", [False, True])
def test_single_process_matches_dense_reference(with_codes: bool) -> None:
    img, txt = _features(6, 8, seed=0)
    codes = None
    positives = None
    if with_codes:  # rows 0 and 3 share an image id, rows 1 and 4 an identical caption
        codes = torch.tensor([[10, 100], [11, 101], [12, 102], [10, 103], [14, 101], [15, 105]])
        positives = duplicate_mask(codes, codes)
        assert positives.sum() == 6 + 4
    module = _loss_module()
    img_c, txt_c = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss, metrics = module(img_c, txt_c, codes)
    loss.backward()

    ref = _loss_module()
    img_r, txt_r = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref_loss = dense_reference(img_r, txt_r, ref.logit_scale[0], ref.logit_bias[0], positives)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(img_c.grad, img_r.grad, **TOL)
    torch.testing.assert_close(txt_c.grad, txt_r.grad, **TOL)
    torch.testing.assert_close(module.logit_scale.grad, ref.logit_scale.grad, **TOL)
    torch.testing.assert_close(module.logit_bias.grad, ref.logit_bias.grad, **TOL)
    assert module.logit_bias.grad.abs().item() > 1e-3  # a gradient that could be wrong
    logits = 3.0 * img @ txt.T
    hits = (positives if positives is not None else torch.eye(6, dtype=torch.bool))[torch.arange(6), logits.argmax(1)]
    assert metrics["siglip_acc_i2t"].item() == pytest.approx(hits.double().mean().item())
    assert metrics["siglip_scale"].item() == pytest.approx(3.0)


# ---- 2 gloo ranks vs the dense single-process step --------------------------------------------------------

WORLD, LOCAL, IN_DIM, EMBED = 2, 3, 5, 4


def _global_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the global batch and its pair codes; caption of row 1 (rank 0) repeats in row 4 (rank 1)."""
    gen = torch.Generator().manual_seed(7)
    x_img = torch.randn(WORLD * LOCAL, IN_DIM, generator=gen, dtype=torch.float64)
    x_txt = torch.randn(WORLD * LOCAL, IN_DIM, generator=gen, dtype=torch.float64)
    codes = torch.tensor([[0, 100], [1, 101], [2, 102], [3, 103], [4, 101], [5, 105]])
    return x_img, x_txt, codes


def _towers() -> nn.Module:
    torch.manual_seed(3)
    return nn.ModuleDict({"img": nn.Linear(IN_DIM, EMBED), "txt": nn.Linear(IN_DIM, EMBED)}).double()


def _forward(towers: nn.Module, x_img: torch.Tensor, x_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    img = F.normalize(towers["img"](x_img), dim=-1)
    txt = F.normalize(towers["txt"](x_txt), dim=-1)
    img.retain_grad()
    txt.retain_grad()
    return img, txt


def _grads(towers: nn.Module, loss: SigLipLoss) -> dict[str, torch.Tensor]:
    named = {f"towers.{k}": p for k, p in towers.named_parameters()}
    named.update({"logit_scale": loss.logit_scale, "logit_bias": loss.logit_bias})
    return {k: p.grad.clone() for k, p in named.items()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    x_img, x_txt, codes = _global_problem()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    out = {}
    for with_codes in (False, True):
        towers, loss_fn = _towers(), _loss_module()
        img, txt = _forward(towers, x_img[rows], x_txt[rows])
        loss, _ = loss_fn(img, txt, codes[rows] if with_codes else None)
        loss.backward()
        grads = _grads(towers, loss_fn)
        for g in grads.values():  # what DeepSpeed does: the mean over ranks
            dist.all_reduce(g)
            g /= world
        out[with_codes] = {"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad, "grads": grads}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_dense_single_process(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path, WORLD)
    x_img, x_txt, codes = _global_problem()
    for with_codes in (False, True):
        towers, loss_fn = _towers(), _loss_module()
        img, txt = _forward(towers, x_img, x_txt)
        positives = duplicate_mask(codes, codes) if with_codes else None
        ref = dense_reference(img, txt, loss_fn.logit_scale[0], loss_fn.logit_bias[0], positives)
        ref.backward()
        ref_grads = _grads(towers, loss_fn)
        got = [r[with_codes] for r in ranks]
        # L = mean over ranks of loss_r; feature gradients are w x dL/dfeat (itc.py's convention)
        torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, ref.detach(), **TOL)
        for r, g in enumerate(got):
            rows = slice(r * LOCAL, (r + 1) * LOCAL)
            torch.testing.assert_close(g["img_grad"], WORLD * img.grad[rows], **TOL)
            torch.testing.assert_close(g["txt_grad"], WORLD * txt.grad[rows], **TOL)
            assert g["grads"].keys() == ref_grads.keys()
            for name, want in ref_grads.items():
                torch.testing.assert_close(g["grads"][name], want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


# ---- selection and refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, objectives", [("clip", ["siglip"]), ("coca", ["siglip", "caption"]),
                                              ("beit3", ["mdm_text", "siglip"])])
def test_siglip_replaces_itc(arch: str, objectives: list[str]) -> None:
    cfg = preset_config(arch, "tiny", objectives=objectives)
    model = build_model(cfg)
    assert isinstance(model.itc, SigLipLoss) and model.itc.logit_scale.requires_grad
    assert "siglip" in model.objectives and "itc" not in model.objectives


@pytest.mark.parametrize("arch, objectives, message", [
    ("clip", ["itc", "siglip"], "list both itc and siglip"),
    ("coca", ["siglip", "itc", "caption"], "list both itc and siglip"),
    ("albef", ["siglip", "itm", "mlm"], "objective siglip is not available for albef: ITM mines its hard negatives"),
    ("vlmo", ["siglip"], "objective siglip is not available for vlmo: ITM mines its hard negatives"),
])  # fmt: skip
def test_impossible_combinations_are_refused(arch: str, objectives: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preset_config(arch, "tiny", objectives=objectives)


@pytest.mark.slow
def test_presets_compose_and_validate(demo_env) -> None:
    from tests.test_config import SINGLE, TWO, composed, demo_data_overrides
    from mmpt.engine.run_setup import validate

    tiny = validate(composed(["experiment=siglip_tiny"]), SINGLE).cfg
    assert tiny.model.objectives == ["siglip"] and tiny.loss.weights == {"siglip": 1.0}
    clip_tiny = validate(composed(["experiment=clip_tiny"]), SINGLE).cfg
    for key in ("data", "optimizer", "scheduler"):  # equal training, only the loss (and the clip norm) differs
        assert getattr(tiny, key) == getattr(clip_tiny, key), key
    assert tiny.trainer.grad_clip == 10.0 and clip_tiny.trainer.grad_clip == 1.0  # measured: RESULTS.md
    assert dataclasses.replace(tiny.trainer, grad_clip=clip_tiny.trainer.grad_clip) == clip_tiny.trainer
    base = validate(composed(["experiment=siglip_base", *demo_data_overrides(demo_env)]), TWO).cfg
    assert base.model.objectives == ["siglip"] and base.model.vision.width == 768 and base.model.vision.patch_size == 16
    assert base.trainer.grad_accum * base.data.batch_size * 2 == 32768  # the paper's global batch on 2 ranks
    assert (base.optimizer.lr, base.optimizer.betas, base.optimizer.weight_decay) == (1e-3, [0.9, 0.95], 0.1)
