"""Pretrained initialisation from local files (mmpt/models/pretrained.py) and the post-LN block option.

Nothing is downloaded: BERT checkpoints are tiny random `transformers` models saved to tmp_path; timm
checkpoints are built by hand with timm's exact key names and shapes and checked against a reference
forward of timm's ViT written below (plus the real timm model where timm imports, which needs torchvision).
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmpt.models.pretrained import load_hf_bert, load_timm_vit, read_state_dict
from mmpt.modules.block import Block, Transformer
from mmpt.modules.encoders import TextTransformer, VisionTransformer

IMG, PATCH, D, DEPTH, HEADS, MLP = 32, 8, 32, 2, 2, 64
TIMM_EPS = 1e-6


# ---- timm: a hand-built checkpoint and a reference forward ------------------------------------------------
def timm_state_dict(img: int = IMG, seed: int = 0, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """Random weights under timm VisionTransformer's names/shapes (class_token, global_pool='token')."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2, center: float = 0.0) -> torch.Tensor:
        return center + scale * torch.randn(*shape, generator=g)

    n = (img // PATCH) ** 2
    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + n, D),
        "patch_embed.proj.weight": r(D, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": r(D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}"
        sd |= {
            f"{b}.norm1.weight": r(D, center=1.0), f"{b}.norm1.bias": r(D),
            f"{b}.attn.qkv.weight": r(3 * D, D), f"{b}.attn.qkv.bias": r(3 * D),
            f"{b}.attn.proj.weight": r(D, D), f"{b}.attn.proj.bias": r(D),
            f"{b}.norm2.weight": r(D, center=1.0), f"{b}.norm2.bias": r(D),
            f"{b}.mlp.fc1.weight": r(MLP, D), f"{b}.mlp.fc1.bias": r(MLP),
            f"{b}.mlp.fc2.weight": r(D, MLP), f"{b}.mlp.fc2.bias": r(D),
        }  # fmt: skip
    sd |= {"norm.weight": r(D, center=1.0), "norm.bias": r(D)}
    sd |= {"head.weight": r(num_classes, D), "head.bias": r(num_classes)}
    return sd


def timm_reference_features(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer.forward_features in plain ops (qkv split as reshape(B, N, 3, heads, hd))."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=TIMM_EPS)
        b, n, _ = h.shape
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // HEADS)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, D)
        x = x + F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=TIMM_EPS)
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=TIMM_EPS)


def our_vit(img: int = IMG) -> VisionTransformer:
    return VisionTransformer(img, PATCH, D, DEPTH, HEADS, mlp_ratio=MLP / D, norm_eps=TIMM_EPS).eval()


def test_timm_vit_matches_reference_forward(tmp_path: Path) -> None:
    sd = timm_state_dict()
    path = tmp_path / "vit.pth"
    torch.save(sd, path)
    vit = our_vit()
    report = load_timm_vit(vit, path)
    assert report.missing == [] and report.unexpected == ["head.weight", "head.bias"] and report.resized == []
    assert ("blocks.1.attn.qkv.weight", "transformer.blocks.1.attn.qkv.weight") in report.mapped
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), timm_reference_features(sd, images), atol=1e-5, rtol=1e-5)


def test_timm_vit_matches_real_timm(tmp_path: Path) -> None:
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except Exception as e:  # timm imports torchvision at package import time
        pytest.skip(f"timm is not importable here ({type(e).__name__}: {e}); covered by the reference-forward test")
    timm_vit = TimmViT(
        img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / D,
        class_token=True, global_pool="token", pre_norm=False, num_classes=10,
    ).eval()  # fmt: skip
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, str(path))
    vit = our_vit()
    load_timm_vit(vit, tmp_path)  # a directory, as a hub snapshot
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), timm_vit.forward_features(images), atol=1e-5, rtol=1e-5)


def test_nested_checkpoint_and_safetensors(tmp_path: Path) -> None:
    sd = timm_state_dict()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "deit.pth")  # DeiT / timm training checkpoints
    assert set(read_state_dict(tmp_path / "deit.pth")) == set(sd)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    assert set(read_state_dict(tmp_path / "ddp.pt")) == set(sd)
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = read_state_dict(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_pos_embed_is_resized_bicubically(tmp_path: Path) -> None:
    sd = timm_state_dict(img=IMG)  # 4x4 grid
    torch.save(sd, tmp_path / "vit.pth")
    vit = our_vit(img=48)  # 6x6 grid, like 224 px weights into a 256 px model
    report = load_timm_vit(vit, tmp_path / "vit.pth")
    assert report.resized == ["patch_embed.pos_embed: grid 4x4 -> 6x6 (bicubic)"]
    pos = vit.patch_embed.pos_embed.detach()
    assert pos.shape == (1, 1 + 36, D)
    torch.testing.assert_close(pos[:, 0], sd["pos_embed"][:, 0])  # [CLS] position kept as is
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)  # row-major patches, as timm
    for antialias in (True, False):  # timm's resample_abs_pos_embed / ALBEF's interpolate_pos_embed
        vit = our_vit(img=48)
        load_timm_vit(vit, tmp_path / "vit.pth", pos_antialias=antialias)
        resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=antialias)
        expected = resized.permute(0, 2, 3, 1).reshape(1, 36, D)
        torch.testing.assert_close(vit.patch_embed.pos_embed.detach()[:, 1:], expected)


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd = {k: v for k, v in timm_state_dict().items() if not k.startswith("blocks.1.mlp")}
    sd["dist_token"] = torch.zeros(1, 1, D)
    torch.save(sd, tmp_path / "vit.pth")
    vit = our_vit()
    before = vit.transformer.blocks[1].mlp.fc1.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="mmpt"):
        report = load_timm_vit(vit, tmp_path / "vit.pth")
    expected_missing = [f"transformer.blocks.1.mlp.{fc}.{p}" for p in ("weight", "bias") for fc in ("fc1", "fc2")]
    assert sorted(report.missing) == sorted(expected_missing)
    assert sorted(report.unexpected) == ["dist_token", "head.bias", "head.weight"]
    assert torch.equal(vit.transformer.blocks[1].mlp.fc1.weight, before)  # left at initialisation
    text = caplog.text
    assert "tensors mapped" in text and "-> patch_embed.pos_embed" in text  # the mapping table
    for key in expected_missing + ["dist_token", "head.weight"]:
        assert key in text
    assert "4 missing" in text and "3 unexpected" in text


def test_wrong_shape_raises_naming_the_key_and_leaves_model_untouched(tmp_path: Path) -> None:
    sd = timm_state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(2 * MLP, D)
    torch.save(sd, tmp_path / "vit.pth")
    vit = our_vit()
    cls_before = vit.patch_embed.cls_token.detach().clone()
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        load_timm_vit(vit, tmp_path / "vit.pth")
    assert torch.equal(vit.patch_embed.cls_token, cls_before)  # all checks run before any copy
    sd = timm_state_dict()
    sd["pos_embed"] = torch.zeros(1, 2 + 16, D)  # a DeiT-distilled table (cls + dist) into a cls-only model
    torch.save(sd, tmp_path / "deit.pth")
    with pytest.raises(ValueError, match="pos_embed"):
        load_timm_vit(vit, tmp_path / "deit.pth")


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_timm_vit(our_vit(), tmp_path / "nope.pth")
    args = argparse.Namespace(lr=1.0)  # a training checkpoint that pickled its arguments (DeiT-style)
    torch.save({"model": timm_state_dict(), "args": args}, tmp_path / "train.pth")
    with pytest.raises(ValueError, match="re-save only its state dict"):
        load_timm_vit(our_vit(), tmp_path / "train.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
        load_hf_bert(bert_text(1), None, tmp_path)


# ---- post-LN blocks ---------------------------------------------------------------------------------------
def test_post_ln_block_semantics() -> None:
    torch.manual_seed(0)
    block = Block(D, HEADS, cross_attention=True, norm_first=False).eval()
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 3, D)
    with torch.no_grad():
        h = block.norm1(x + block.attn(x))
        h = block.norm_cross(h + block.cross_attn(h, ctx))
        expected = block.norm2(h + block.mlp(h))
        torch.testing.assert_close(block(x, context=ctx), expected)
        h = block.norm1(x + block.attn(x))
        torch.testing.assert_close(block(x), block.norm2(h + block.mlp(h)))  # no context: branch skipped
    tower = TextTransformer(50, 8, D, 1, HEADS, norm_first=False)
    assert isinstance(tower.norm, torch.nn.Identity) and tower.embed.norm is not None
    default = TextTransformer(50, 8, D, 1, HEADS)
    assert default.norm_first and isinstance(default.norm, torch.nn.LayerNorm) and default.embed.norm is None


# ---- Hugging Face BERT ------------------------------------------------------------------------------------
BERT_EPS = 1e-12


def bert_text(layers: int, max_len: int = 12, norm_eps: float = BERT_EPS) -> TextTransformer:
    tower = TextTransformer(100, max_len, D, layers, HEADS, mlp_ratio=MLP / D, norm_eps=norm_eps, norm_first=False)
    return tower.eval()


def bert_fusion(layers: int) -> Transformer:
    return Transformer(D, layers, HEADS, MLP / D, norm_eps=BERT_EPS, cross_attention=True, norm_first=False).eval()


def tiny_bert_config(layers: int, **extra: object) -> object:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (dev extra)")
    return transformers.BertConfig(
        hidden_size=D, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=MLP,
        vocab_size=100, max_position_embeddings=16, **extra,
    )  # fmt: skip


def randomise_norms_(model: torch.nn.Module) -> None:
    """HF initialises LayerNorms to 1/0; random values make a swapped LayerNorm mapping visible."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "LayerNorm" in name:
            p.data = (1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g)


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 100, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


def test_bert_text_and_fusion_match_hf_bert(tmp_path: Path) -> None:
    cfg = tiny_bert_config(4)
    from transformers import BertModel

    torch.manual_seed(0)
    bert = BertModel(cfg).eval()
    randomise_norms_(bert)
    bert.save_pretrained(tmp_path)
    text, fusion = bert_text(2), bert_fusion(2)
    report = load_hf_bert(text, fusion, tmp_path, text_layers=2)
    assert report.notes == []
    assert sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]
    cross = ("norm_cross", "cross_attn.q", "cross_attn.kv", "cross_attn.proj")
    expected_missing = [f"fusion.blocks.{i}.{m}.{p}" for i in range(2) for m in cross for p in ("weight", "bias")]
    assert sorted(report.missing) == sorted(expected_missing)  # ALBEF: cross-attention starts random
    assert report.resized == ["text_encoder.embed.pos_embed: positions cropped 16 -> 12"]
    qkv = "encoder.layer.3.attention.self.{query,key,value}.weight"  # stacked in our fused qkv's order
    assert (qkv, "fusion.blocks.1.attn.qkv.weight") in report.mapped

    ids, mask = ids_and_mask()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        t = text(ids, mask)
        f = fusion(t, key_padding_mask=mask)  # no context: self-attention + FFN only
    real = mask.bool()
    torch.testing.assert_close(t[real], hidden[2][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f[real], hidden[4][real], atol=1e-5, rtol=1e-5)


def test_bert_cross_attention_weights_are_mapped(tmp_path: Path) -> None:
    cfg = tiny_bert_config(2, is_decoder=True, add_cross_attention=True)
    from transformers import BertLMHeadModel

    torch.manual_seed(0)
    lm = BertLMHeadModel(cfg).eval()
    randomise_norms_(lm)
    lm.save_pretrained(tmp_path)
    text, fusion = bert_text(0), bert_fusion(2)  # all BERT layers are fusion layers
    report = load_hf_bert(text, fusion, tmp_path / "model.safetensors")  # the file itself, keys with `bert.`
    assert report.missing == []
    assert report.unexpected and all(k.startswith("cls.") for k in report.unexpected)  # the LM head
    kv = ("encoder.layer.1.crossattention.self.{key,value}.weight", "fusion.blocks.1.cross_attn.kv.weight")
    assert kv in report.mapped

    ids, mask = ids_and_mask()
    ctx = torch.randn(3, 5, D)
    ctx_mask = torch.ones(3, 5, dtype=torch.long)
    ctx_mask[0, 3:] = 0
    with torch.no_grad():
        out = lm.bert(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask
        ).last_hidden_state  # a decoder: causal self-attention
        ours = fusion(text(ids, mask), key_padding_mask=mask, is_causal=True, context=ctx, context_mask=ctx_mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], out[real], atol=1e-5, rtol=1e-5)


def test_bert_needs_post_ln_and_checks_config(tmp_path: Path) -> None:
    cfg = tiny_bert_config(2)
    from transformers import BertForMaskedLM

    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    pre_ln = TextTransformer(100, 12, D, 1, HEADS, mlp_ratio=MLP / D)
    with pytest.raises(ValueError, match="norm_first=False"):
        load_hf_bert(pre_ln, None, tmp_path)
    with pytest.raises(ValueError, match="norm_first=False"):
        load_hf_bert(bert_text(1), Transformer(D, 1, HEADS, MLP / D, cross_attention=True), tmp_path)
    report = load_hf_bert(bert_text(1, norm_eps=1e-5), None, tmp_path)  # eps differs from the checkpoint's
    assert any("layer_norm_eps" in n for n in report.notes)
    assert "encoder.layer.1.output.dense.weight" in report.unexpected  # layers beyond the stacks
    assert any(k.startswith("cls.") for k in report.unexpected)
    with pytest.raises(ValueError, match="num_attention_heads=2"):
        load_hf_bert(TextTransformer(100, 12, D, 1, 4, mlp_ratio=MLP / D, norm_first=False), None, tmp_path)
    with pytest.raises(ValueError, match="text_layers=2"):
        load_hf_bert(bert_text(1), None, tmp_path, text_layers=2)
    with pytest.raises(ValueError, match=r"word_embeddings|token_embed"):
        load_hf_bert(TextTransformer(99, 12, D, 1, HEADS, mlp_ratio=MLP / D, norm_first=False), None, tmp_path)


# ---- model.init on a whole model ---------------------------------------------------------------------------
def test_model_init_loads_albef_towers_and_resyncs_the_teacher(tmp_path: Path) -> None:
    """`model.init.vision/text` on ALBEF: BERT layers 0-1 -> text encoder, 2-3 -> fusion, timm ViT -> visual;
    the momentum teacher (deep-copied from the random student at build time) is re-synced to the loaded weights."""
    cfg = tiny_bert_config(4)
    from transformers import BertModel

    from mmpt.models.albef import ALBEFConfig, build_albef
    from mmpt.models.pretrained import InitConfig, apply_init

    torch.manual_seed(0)
    bert = BertModel(cfg).eval()
    randomise_norms_(bert)
    bert.save_pretrained(tmp_path / "bert")
    torch.save(timm_state_dict(), tmp_path / "vit.pth")
    model = build_albef(ALBEFConfig(
        vision={"image_size": IMG, "patch_size": PATCH, "width": D, "layers": DEPTH, "heads": HEADS,
                "mlp_ratio": MLP / D},
        text={"width": D, "layers": 2, "heads": HEADS, "mlp_ratio": MLP / D, "vocab_size": 100, "max_text_len": 12,
              "norm_first": False, "norm_eps": BERT_EPS},  # BERT's post-LN layout
        fusion_layers=2, contrastive={"embed_dim": 16}, momentum={"enabled": True, "queue_size": 32},
    )).eval()  # fmt: skip
    assert model.teacher is not None
    reports = apply_init(model, InitConfig(vision=str(tmp_path / "vit.pth"), text=str(tmp_path / "bert")))
    assert len(reports) == 2 and reports[1].unexpected == ["pooler.dense.bias", "pooler.dense.weight"]
    ids, mask = ids_and_mask()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = model.text.encode(ids, mask)
    torch.testing.assert_close(ours[mask.bool()], hidden[2][mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.visual.state_dict()["transformer.blocks.0.attn.qkv.weight"],
                               timm_state_dict()["blocks.0.attn.qkv.weight"])
    student = dict(model.text.named_parameters())
    for name, p in model.teacher["text"].named_parameters():
        torch.testing.assert_close(p, student[name])  # teacher == loaded student, not the random init
