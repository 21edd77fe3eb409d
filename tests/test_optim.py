"""Warm-up + cosine schedule values and AdamW parameter groups."""
from __future__ import annotations

import math

import pytest
import torch

from mmpt.engine.config import ConfigError, OptimizerConfig, SchedulerConfig
from mmpt.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from mmpt.models.clip import CLIPConfig, build_clip


def test_lr_factor_hand_values():
    # warm-up 10 of 110 steps, min ratio 0.1
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(warmup_steps=4, min_lr_ratio=0.0), max_steps=8)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[4] == pytest.approx(1.0) and seen[6] == pytest.approx(0.5)


def test_no_weight_decay_on_norms_biases_tokens_and_temperature():
    model = build_clip(CLIPConfig(vision={"image_size": 32, "patch_size": 8, "width": 32, "heads": 2},
                                  text={"width": 32, "heads": 2, "vocab_size": 50, "max_text_len": 8},
                                  contrastive={"embed_dim": 32}))  # fmt: skip
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert any("logit_scale" in n for n in no_decay)
    assert any("pos_embed" in n for n in no_decay) and any("cls_token" in n for n in no_decay)
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert not any("norm" in n or n.endswith("bias") for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-6))
    assert opt.defaults["betas"] == (0.9, 0.98)


def test_lr_mult_gives_matching_parameters_their_own_group_and_schedule():
    """SigLIP's bias at 10x lr: its own group at lr*10, no decay; the scheduler scales it like the others;
    one AdamW step moves it ~10x as far as an equally-signed parameter at the base lr."""
    model = build_clip(CLIPConfig(vision={"image_size": 32, "patch_size": 8, "width": 32, "heads": 2},
                                  text={"width": 32, "heads": 2, "vocab_size": 50, "max_text_len": 8},
                                  contrastive={"embed_dim": 32}, objectives=["siglip"]))  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1, lr_mult={"logit_bias": 10.0}))
    assert len(opt.param_groups) == 3
    plain_decay, plain_free, scaled = opt.param_groups
    assert [names[id(p)] for p in scaled["params"]] == ["itc.logit_bias"]
    assert scaled["lr"] == pytest.approx(1e-2) and scaled["weight_decay"] == 0.0
    assert plain_decay["lr"] == pytest.approx(1e-3) and plain_free["lr"] == pytest.approx(1e-3)
    assert not any(names[id(p)] == "itc.logit_bias" for p in plain_free["params"])
    sched = build_scheduler(opt, SchedulerConfig(warmup_steps=4, min_lr_ratio=0.0), max_steps=8)
    bias, scale = model.itc.logit_bias, model.itc.logit_scale
    before = (bias.item(), scale.item())
    bias.grad, scale.grad = torch.ones_like(bias), torch.ones_like(scale)
    opt.step()  # first Adam step: each parameter moves by its group's lr (x warm-up 1/4) against its grad sign
    assert before[0] - bias.item() == pytest.approx(1e-2 / 4, rel=1e-3)
    assert before[1] - scale.item() == pytest.approx(1e-3 / 4, rel=1e-3)
    sched.step()
    assert scaled["lr"] == pytest.approx(1e-2 * 2 / 4) and plain_free["lr"] == pytest.approx(1e-3 * 2 / 4)
    with pytest.raises(ValueError, match="needs the base lr"):
        param_groups(model, 0.1, lr_mult={"logit_bias": 2.0})
    with pytest.raises(ConfigError, match=r"\['logit_bais'\] match no parameter"):  # a typo is refused
        param_groups(model, 0.1, lr=1e-3, lr_mult={"logit_bais": 2.0})
