"""`model.activation_checkpointing` over every registered architecture: same gradients, the configured blocks
recomputed (and only those), eval / cached decoding untouched, bad values refused by the config.

A checkpointed block is entered twice per training step (once in forward, once when backward recomputes it),
so counting block calls with forward pre-hooks says exactly which blocks were checkpointed.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from torch import nn

from mmpt.models.config_parts import TowerConfig
from mmpt.models.registry import arch_entry, arch_names, build_model, model_config, preset_config
from mmpt.modules.block import Transformer
from mmpt.modules.checkpointing import block_stacks
from tests.test_arch_contract import build, make_batch, tiny_config, total_loss

DROPOUT = 0.1  # non-zero: the recomputed forward must replay the same dropout masks

CASES = [pytest.param(arch, {}, id=arch) for arch in arch_names()] + [
    pytest.param("albef", {"momentum": {"enabled": True, "queue_size": 64}}, id="albef-momentum"),
]


def config(arch: str, setting: bool | int, **extra: Any) -> Any:
    """The arch's tiny contract config (default objectives) with dropout in every tower and `setting`."""
    cfg = tiny_config(arch, arch_entry(arch).config_cls.default_objectives)
    towers = {f.name: {"dropout": DROPOUT} for f in fields(cfg) if isinstance(getattr(cfg, f.name), TowerConfig)}
    return replace(cfg, **{**{k: replace(getattr(cfg, k), **v) for k, v in towers.items()}, **extra},
                   activation_checkpointing=setting)


def count_block_calls(model: nn.Module) -> dict[str, int]:
    """Stack-qualified block name -> forward calls, counted by hooks from now on (the dict fills as it runs)."""
    calls: dict[str, int] = {}
    for stack_name, stack in block_stacks(model).items():
        for i, block in enumerate(stack.blocks):
            name = f"{stack_name}.blocks.{i}"
            calls[name] = 0

            def hook(_m: nn.Module, _args: Any, name: str = name) -> None:
                calls[name] += 1

            block.register_forward_pre_hook(hook)  # a pre-hook: the recompute stops once it has what backward needs
    return calls


def train_step(model: nn.Module, cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One forward + backward in training mode: (parameter gradients, block calls)."""
    calls = count_block_calls(model)
    total_loss(model.train(), make_batch(model, cfg)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, dict(calls)


@pytest.mark.parametrize(("arch", "extra"), CASES)
def test_checkpointed_gradients_equal_plain_ones(arch: str, extra: dict[str, Any]) -> None:
    plain_grads, plain_calls = train_step(build(config(arch, False, **extra)), config(arch, False, **extra))
    cfg = config(arch, True, **extra)
    model = build(cfg)
    assert all(stack.checkpoint_blocks == len(stack.blocks) for stack in block_stacks(model).values())
    grads, calls = train_step(model, cfg)

    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=1e-6, msg=name)
    # every block that trained was recomputed once in backward; teacher copies run without autograd: never
    for name, n in calls.items():
        want = plain_calls[name] * (1 if name.startswith("teacher.") else 2)
        assert n == want and plain_calls[name] > 0, (name, n, plain_calls[name])


@pytest.mark.parametrize("arch", arch_names())
def test_an_int_checkpoints_that_many_blocks_of_each_stack(arch: str) -> None:
    _, plain_calls = train_step(build(config(arch, False)), config(arch, False))
    cfg = config(arch, 1)
    model = build(cfg)
    stacks = block_stacks(model)
    assert stacks and {name: s.checkpoint_blocks for name, s in stacks.items()} == dict.fromkeys(stacks, 1)
    _, calls = train_step(model, cfg)
    for name, n in calls.items():
        recomputed = name.endswith(".blocks.0")
        assert n == plain_calls[name] * (2 if recomputed else 1) and plain_calls[name] > 0, (name, n, plain_calls[name])
    assert any(not name.endswith(".blocks.0") for name in calls)  # some stack had a block left plain


@pytest.mark.parametrize("arch", arch_names())
def test_no_grad_forward_is_unchanged_and_runs_each_block_as_often(arch: str) -> None:
    """Eval / inference (no autograd): the same losses, and no block runs more often than without checkpointing."""
    plain, ckpt = build(config(arch, False)).eval(), build(config(arch, True)).eval()
    batch = make_batch(ckpt, config(arch, True))
    plain_calls, calls = count_block_calls(plain), count_block_calls(ckpt)
    with torch.no_grad():
        torch.manual_seed(1)
        want = plain(batch).losses
        torch.manual_seed(1)
        got = ckpt(batch).losses
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert calls == plain_calls and any(calls.values())


def test_cached_decoding_with_autograd_on_is_not_checkpointed() -> None:
    """KV-cached decoding writes the cache inside each block: a recompute would append twice. With a cache the
    stack runs plainly even when autograd records, and equals the full causal forward."""
    torch.manual_seed(0)
    stack = Transformer(32, 2, 2, cross_attention=True)
    stack.checkpoint_blocks = 2
    calls = count_block_calls(stack)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    full = stack(x, is_causal=True, context=context)
    assert set(calls.values()) == {1}
    cache = stack.new_cache()
    first = stack(x[:, :3], is_causal=True, context=context, cache=cache)
    rest = stack(x[:, 3:], is_causal=True, cache=cache)
    assert set(calls.values()) == {3}
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=0, atol=1e-6)
    (first.sum() + rest.sum()).backward()  # no recompute in backward either
    assert set(calls.values()) == {3}


@pytest.mark.parametrize("arch", arch_names())
@pytest.mark.parametrize("bad", [-1, "deeper"])
def test_invalid_values_are_refused_with_the_tower_depths(arch: str, bad: int | str) -> None:
    cfg = preset_config(arch, "tiny")
    deepest = max(cfg.block_stacks().values())
    value = deepest + 1 if bad == "deeper" else bad
    with pytest.raises(ValueError, match=rf"activation_checkpointing={value} must be true, false or a number of "
                                         rf"blocks per tower in \[0, {deepest}\] \(blocks per tower: "):
        preset_config(arch, "tiny", activation_checkpointing=value)
    assert preset_config(arch, "tiny", activation_checkpointing=deepest).activation_checkpointing == deepest


def test_the_schema_takes_bools_and_ints_from_the_command_line_and_refuses_other_types() -> None:
    dotlist = OmegaConf.from_dotlist(["arch=clip", "preset=tiny", "activation_checkpointing=true"])
    assert model_config(dotlist).activation_checkpointing is True
    dotlist = OmegaConf.from_dotlist(["arch=clip", "preset=tiny", "activation_checkpointing=2"])
    assert model_config(dotlist).activation_checkpointing == 2
    with pytest.raises(ValidationError, match="activation_checkpointing"):
        model_config(OmegaConf.from_dotlist(["arch=clip", "preset=tiny", "activation_checkpointing=all"]))
    assert not any(s.checkpoint_blocks for s in block_stacks(build_model(preset_config("clip", "tiny"))).values())
