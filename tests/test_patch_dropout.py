"""Patch dropout (FLIP, `model.patch_dropout`): what is kept, when, in which architectures, at what cost.

The module is checked on tokens that carry their own index (so a kept token says which patch it was); the
architectures through the registry's tiny cases of tests/test_arch_contract.py at p = 0.5, 32 px / patch 8
(16 patches -> 8 kept).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmpt.cli.common import CONF_DIR
from mmpt.engine.config import ConfigError, resolve, typed_config
from mmpt.models.protocol import step_flops
from mmpt.models.registry import build_model, preset_config
from mmpt.modules.multiway_encoder import MultiwayEncoder
from mmpt.modules.patch_dropout import PatchDropout, kept_patches
from tests.test_arch_contract import B, CASES, build, case_id, make_batch, pairs, tiny_config, total_loss

P = 0.5
NEEDS_EVERY_PATCH = {"vlmo": "mim", "beit3": "mdm_image"}  # masked image modeling: targets are masked patches
ALLOWED = [(a, o) for a, o in CASES if NEEDS_EVERY_PATCH.get(a) not in o]
REFUSED = [(a, o) for a, o in CASES if NEEDS_EVERY_PATCH.get(a) in o]


def indexed_tokens(b: int, n: int, d: int = 3) -> torch.Tensor:
    """`b n d` where every channel of token i holds i (0 = [CLS]), plus 1000 * sample so rows differ."""
    index = torch.arange(n, dtype=torch.float)[None, :, None] + 1000.0 * torch.arange(b)[:, None, None]
    return index.expand(b, n, d).clone()


def with_dropout(cfg: Any, p: float = P) -> Any:
    return dataclasses.replace(cfg, patch_dropout=p)


# ---- the module ---------------------------------------------------------------------------------------------

def test_kept_count_is_rounded_and_at_least_one() -> None:
    assert kept_patches(196, 0.5) == 98 and kept_patches(196, 0.75) == 49 and kept_patches(196, 0.0) == 196
    assert kept_patches(16, 0.3) == 11  # round(11.2)
    assert kept_patches(64, 0.99) == 1  # round(0.64) = 1; never zero patches
    assert kept_patches(6, 0.25) == 4  # round(4.5): Python rounds half to even
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            kept_patches(16, bad)


def test_training_keeps_cls_and_a_different_subset_of_real_patches_per_sample() -> None:
    b, n = 8, 16
    x = indexed_tokens(b, 1 + n)
    drop = PatchDropout(P, prefix_tokens=1).train()
    torch.manual_seed(0)
    out = drop(x)
    assert out.shape == (b, 1 + 8, 3)
    local = out - 1000.0 * torch.arange(b)[:, None, None]  # back to token indices
    assert (local[:, :, 1:] == local[:, :, :1]).all()  # whole tokens moved, channels together
    idx = local[:, :, 0].long()
    assert (idx[:, 0] == 0).all()  # [CLS] first, always kept
    patches = idx[:, 1:]
    assert ((patches >= 1) & (patches <= n)).all()
    assert (patches[:, 1:] > patches[:, :-1]).all()  # distinct, in their original order
    assert len({tuple(row.tolist()) for row in patches}) == b  # every sample its own subset
    # the same RNG state draws the same subset (what GradCache-style re-forwards rely on)
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)
    # no prefix (CoCa's ViT has no [CLS]): every token is a patch
    bare = PatchDropout(0.75, prefix_tokens=0).train()(indexed_tokens(b, n))
    assert bare.shape == (b, 4, 3)


def test_eval_mode_and_p_zero_are_the_identity() -> None:
    x = indexed_tokens(2, 17)
    assert PatchDropout(P).eval()(x) is x
    assert PatchDropout(0.0).train()(x) is x


def test_multiway_encoder_refuses_an_image_mask_with_dropout() -> None:
    enc = MultiwayEncoder(width=32, layers=1, heads=2, image_size=32, patch_size=8, vocab_size=64, max_text_len=8,
                          patch_dropout=P).train()
    images, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="patch dropout cannot be combined with an image mask"):
        enc.encode_image(images, mask)
    assert enc.encode_image(images).shape == (2, 1 + 8, 32)
    assert enc.eval().encode_image(images, mask).shape == (2, 1 + 16, 32)


# ---- the architectures ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "objectives"), [pytest.param(a, o, id=case_id(a, o)) for a, o in ALLOWED])
def test_training_step_runs_on_kept_tokens_with_matching_flops(arch: str, objectives: tuple[str, ...]) -> None:
    """Every allowed case trains at p = 0.5: finite losses, a finite gradient for every trainable parameter, the image
    encoder sees 1 + 8 tokens, and flops_per_sample counts those (FlopCounterMode within 10%)."""
    cfg = with_dropout(tiny_config(arch, objectives))
    model = build(cfg).train()
    batch = make_batch(model, cfg)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss = total_loss(model, batch)
        loss.backward()
    assert torch.isfinite(loss)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # reached and finite (whether a sparse MLM draw masks any text-only token is chance: zero is allowed there)
    assert not [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    patch_proj = next(p for n, p in trainable if n.endswith("patch_embed.proj.weight"))
    assert patch_proj.grad.any()  # the kept patches train the patch embedding
    assert counter.get_total_flops() == pytest.approx(step_flops(model, batch), rel=0.1)
    images = pairs(cfg).images
    with torch.no_grad():
        tokens = model.visual(images) if hasattr(model, "visual") else model.encoder.encode_image(images)
    has_cls = arch != "coca" or cfg.image_pool == "cls"  # CoCa's ViT has a [CLS] only when it embeds images by it
    assert tokens.shape[1] == has_cls + 8


def test_albef_with_a_momentum_teacher_trains_and_the_teacher_sees_every_patch() -> None:
    cfg = with_dropout(tiny_config("albef", ("itc", "itm", "mlm")))
    cfg = dataclasses.replace(cfg, momentum=dataclasses.replace(cfg.momentum, enabled=True, queue_size=2 * B))
    model = build(cfg).train()
    batch = make_batch(model, cfg)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        total_loss(model, batch).backward()
    assert counter.get_total_flops() == pytest.approx(step_flops(model, batch), rel=0.1)
    assert model.teacher is not None
    with torch.no_grad():
        assert model.teacher["visual"](batch.images).shape[1] == 1 + 16  # eval-mode teacher: no dropout
        assert model.visual(batch.images).shape[1] == 1 + 8


DEFAULT_ALLOWED = {"clip": ("itc",), "coca": ("itc", "caption"), "albef": ("itc", "itm", "mlm"),
                   "vlmo": ("itc", "itm", "mlm"), "beit3": ("mdm_text", "itc")}


@pytest.mark.parametrize("arch", sorted(DEFAULT_ALLOWED))
def test_eval_mode_is_exactly_the_model_without_dropout(arch: str) -> None:
    """Same weights (dropout has none), eval mode: embeddings, losses and capabilities equal the p = 0 model."""
    cfg = tiny_config(arch, DEFAULT_ALLOWED[arch])
    plain, dropped = build(cfg).eval(), build(with_dropout(cfg)).eval()
    batch = make_batch(plain, cfg)
    view = pairs(cfg)
    with torch.no_grad():
        assert torch.equal(plain.encode_image(view.images), dropped.encode_image(view.images))
        want, got = total_loss(plain, batch), total_loss(dropped, batch)
        assert torch.equal(want, got)
        if "itm_score" in plain.capabilities:
            args = (view.images, view.input_ids, view.attention_mask)
            assert torch.equal(plain.itm_score(*args), dropped.itm_score(*args))
    if "generate" in plain.capabilities:  # generation never drops, even if called in training mode
        seen: list[int] = []
        dropped.visual.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
        with torch.no_grad():
            assert torch.equal(plain.generate(view.images, max_len=5), dropped.train().generate(view.images, max_len=5))
        assert seen == [16 + (cfg.image_pool == "cls")]  # every patch (+ the ViT [CLS] when CoCa embeds by it)


@pytest.mark.parametrize(("arch", "objectives"), [pytest.param(a, o, id=case_id(a, o)) for a, o in REFUSED])
def test_masked_image_modeling_refuses_patch_dropout(arch: str, objectives: tuple[str, ...]) -> None:
    want = (rf"patch_dropout=0.5 drops image patches but objectives \['{NEEDS_EVERY_PATCH[arch]}'\] predict masked "
            r"patches .* set model.patch_dropout=0")
    with pytest.raises(ValueError, match=want):
        with_dropout(tiny_config(arch, objectives))


@pytest.mark.parametrize("bad", [1.0, -0.25])
def test_out_of_range_rates_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"patch_dropout=.* must be in \[0, 1\)"):
        preset_config("clip", "tiny", patch_dropout=bad)


# ---- Hydra ----------------------------------------------------------------------------------------------------

def typed(overrides: list[str]) -> Any:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "tokenizer.path=x"])
    return typed_config(resolve(cfg))


def test_the_cli_override_composes_and_reaches_the_vit() -> None:
    cfg = typed(["experiment=clip_tiny", "model.patch_dropout=0.5"])
    assert cfg.model.patch_dropout == 0.5
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.visual.patch_dropout.p == 0.5 and model.visual.num_train_tokens == 1 + 32  # 64 px / 8: 64 patches
    assert typed(["experiment=clip_tiny"]).model.patch_dropout == 0.0  # default: off


def test_the_cli_refuses_patch_dropout_with_masked_image_modeling() -> None:
    with pytest.raises(ConfigError, match=r"model: .*patch_dropout=0.5 drops image patches but objectives \['mim'\]"):
        typed(["model=vlmo/tiny", "model.objectives=[itc,mim]", "model.patch_dropout=0.5"])
