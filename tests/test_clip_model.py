"""CLIP: protocol, forward/backward, padding invariance, loss at init, tiny overfit, no-decay rule, base size
and FLOPs (flops_per_sample against FlopCounterMode at tiny size: tests/test_arch_contract.py)."""
from __future__ import annotations

import math

import pytest
import torch

from mmpt.data.batch import Batch
from mmpt.models.clip import CLIP, CLIPConfig, build_clip
from mmpt.models.protocol import ModelOutput, PretrainModel
from mmpt.models.registry import build_model, preset_config
from mmpt.modules.block import no_weight_decay_names

B, L, VOCAB = 8, 16, 100


def tiny_config(**overrides: object) -> CLIPConfig:
    text = {"vocab_size": VOCAB, "max_text_len": L}
    return CLIPConfig(vision={"image_size": 32, "patch_size": 8}, text=text, **overrides)  # type: ignore[arg-type]


def make_batch(seed: int = 0, b: int = B) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, L), generator=g)
    lengths = torch.randint(4, L + 1, (b,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()  # right padding, 1 = real token
    ids = ids.masked_fill(mask == 0, 0)
    ids[:, 0] = 2  # [CLS]
    return Batch(images=torch.randn(b, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask)


@pytest.fixture
def model() -> CLIP:
    torch.manual_seed(0)
    return build_clip(tiny_config())


def test_protocol_and_registry(model: CLIP) -> None:
    assert isinstance(model, PretrainModel)
    assert model.objectives == ("itc",) and model.data_kinds == ("pairs",) and model.capabilities == {"grad_cache"}
    text = {"vocab_size": VOCAB, "max_text_len": L}
    built = build_model({"arch": "clip", "vision": {"image_size": 32}, "text": text})
    assert isinstance(built, CLIP) and built.config.vision.image_size == 32 and built.config.vision.patch_size == 8
    out = built(make_batch())
    assert isinstance(out, ModelOutput) and set(out.losses) == {"itc"}
    assert {"itc_acc", "temperature"} <= set(out.metrics)
    assert all(not v.requires_grad for v in out.metrics.values())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"invalid clip config: .*multiple of vision\.patch_size"):
        CLIPConfig(vision={"image_size": 30, "patch_size": 8})
    with pytest.raises(ValueError, match=r"divisible by text\.heads"):
        CLIPConfig(text={"width": 30, "heads": 4})
    with pytest.raises(ValueError, match="min_temperature <= temperature_init"):
        CLIPConfig(contrastive={"temperature_init": 0.005})  # below min_temperature 0.01 (logit scale <= 100)
    with pytest.raises(ValueError, match="objectives"):
        CLIPConfig(objectives=["itm"])


def test_forward_backward_reaches_every_parameter(model: CLIP) -> None:
    loss = model(make_batch()).losses["itc"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_encodings_are_normalized(model: CLIP) -> None:
    batch = make_batch()
    img = model.encode_image(batch.images)
    txt = model.encode_text(batch.input_ids, batch.attention_mask)
    assert img.shape == txt.shape == (B, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(B))


@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(causal: bool) -> None:
    torch.manual_seed(0)
    model = build_clip(tiny_config(text_causal=causal)).eval()
    batch = make_batch()
    pad = batch.attention_mask == 0
    assert pad.any()
    other_ids = batch.input_ids.clone()
    other_ids[pad] = torch.randint(5, VOCAB, (int(pad.sum()),))
    torch.testing.assert_close(
        model.encode_text(batch.input_ids, batch.attention_mask), model.encode_text(other_ids, batch.attention_mask)
    )
    # Sanity: changing a real token does change the embedding.
    changed = batch.input_ids.clone()
    changed[:, 1] = (changed[:, 1] + 1) % VOCAB
    assert not torch.allclose(
        model.encode_text(batch.input_ids, batch.attention_mask), model.encode_text(changed, batch.attention_mask)
    )


def test_loss_near_log_batch_at_init(model: CLIP) -> None:
    loss = model(make_batch()).losses["itc"].item()
    assert abs(loss - math.log(B)) < 0.5, loss


def test_adamw_steps_reduce_loss(model: CLIP) -> None:
    batch = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss = model(batch).losses["itc"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_no_weight_decay_names(model: CLIP) -> None:
    names = no_weight_decay_names(model)
    assert {"itc.logit_scale", "visual.patch_embed.pos_embed", "visual.patch_embed.cls_token", "text.embed.pos_embed"} <= names
    assert {"visual.norm.weight", "text.transformer.blocks.0.norm1.weight", "visual.patch_embed.proj.bias"} <= names
    all_names = {n for n, _ in model.named_parameters()}
    assert all(n in names for n in all_names if n.endswith("bias"))
    decayed = all_names - names
    assert {"text.embed.token_embed.weight", "visual.transformer.blocks.1.attn.qkv.weight", "vision_proj.proj.weight"} <= decayed
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decayed)


def test_init_recipe(model: CLIP) -> None:
    assert model.itc.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    w = model.visual.transformer.blocks[0].mlp.fc1.weight
    assert 0.015 < w.std().item() < 0.025 and w.abs().max().item() <= 0.04 + 1e-6
    assert (model.text.transformer.blocks[0].attn.qkv.bias == 0).all()


def test_vit_b16_preset_has_openai_param_count() -> None:
    with torch.device("meta"):
        model = build_clip(preset_config("clip", "base"))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == pytest.approx(149.6e6, rel=0.01), n_params
    assert model.flops_per_sample() == pytest.approx(123.3e9, rel=0.01)
