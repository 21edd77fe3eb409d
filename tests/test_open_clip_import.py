"""open_clip state dicts -> mmpt CLIP / CoCa through `model.init.checkpoint`.

The open_clip file is made from a random transformers.CLIPModel with the documented open_clip names (written
out here by hand, independently of mmpt/interop), so the imported model must give transformers' embeddings
and hold every open_clip tensor under the mmpt name it belongs to."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mmpt.engine.checkpoint import read_init_checkpoint  # noqa: E402
from mmpt.models.pretrained import InitConfig, apply_init  # noqa: E402
from mmpt.models.registry import build_model, preset_config  # noqa: E402
from tests.test_hf_interop import TOL, assert_same_as_hf, captions, hf_embeddings, random_hf_clip  # noqa: E402

StateDict = dict[str, torch.Tensor]


def open_clip_block(hf: StateDict, src: str, dst: str) -> StateDict:
    """One HF encoder layer in open_clip's ResidualAttentionBlock names."""
    out = {f"{dst}.attn.in_proj_{p}": torch.cat([hf[f"{src}.self_attn.{n}_proj.{p}"] for n in "qkv"])
           for p in ("weight", "bias")}  # fmt: skip
    for theirs, ours in (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
        for p in ("weight", "bias"):
            out[f"{dst}.{theirs}.{p}"] = hf[f"{src}.{ours}.{p}"]
    return out


def open_clip_state_dict(hf_model: nn.Module, text_prefix: str = "") -> StateDict:
    """open_clip's CLIP (text at the top level) or CustomTextCLIP (text under `text.`) names."""
    hf = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    v, t = "vision_model", "text_model"
    sd = {
        "visual.conv1.weight": hf[f"{v}.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf[f"{v}.embeddings.class_embedding"],
        "visual.positional_embedding": hf[f"{v}.embeddings.position_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].t().contiguous(),
        f"{text_prefix}token_embedding.weight": hf[f"{t}.embeddings.token_embedding.weight"],
        f"{text_prefix}positional_embedding": hf[f"{t}.embeddings.position_embedding.weight"],
        f"{text_prefix}text_projection": hf["text_projection.weight"].t().contiguous(),
        "logit_scale": hf["logit_scale"],
    }
    for p in ("weight", "bias"):
        sd[f"visual.ln_pre.{p}"] = hf[f"{v}.pre_layrnorm.{p}"]
        sd[f"visual.ln_post.{p}"] = hf[f"{v}.post_layernorm.{p}"]
        sd[f"{text_prefix}ln_final.{p}"] = hf[f"{t}.final_layer_norm.{p}"]
    for i in range(2):
        sd |= open_clip_block(hf, f"{v}.encoder.layers.{i}", f"visual.transformer.resblocks.{i}")
        sd |= open_clip_block(hf, f"{t}.encoder.layers.{i}", f"{text_prefix}transformer.resblocks.{i}")
    return sd


def load(model: nn.Module, path: Path) -> list:
    return apply_init(model, InitConfig(checkpoint=str(path)), read_init_checkpoint)


def openai_tiny(**overrides: object) -> nn.Module:
    return build_model(preset_config("clip", "openai_tiny", text={"vocab_size": 120}, **overrides)).eval()


def test_open_clip_clip_matches_transformers_and_every_key(tmp_path: Path) -> None:
    hf = random_hf_clip()
    sd = open_clip_state_dict(hf)
    sd["attn_mask"] = torch.full((32, 32), float("-inf")).triu(1)  # a buffer older open_clip files carry
    torch.save(sd, tmp_path / "open_clip.pt")
    model = openai_tiny()
    (report,) = load(model, tmp_path / "open_clip.pt")
    assert report.missing == [] and report.unexpected == ["attn_mask"]
    assert any("quick-GELU" in note for note in report.notes)
    assert_same_as_hf(model, hf)
    ours = model.state_dict()
    assert torch.equal(ours["visual.patch_embed.proj.weight"], sd["visual.conv1.weight"])
    assert torch.equal(ours["visual.patch_embed.cls_token"].flatten(), sd["visual.class_embedding"])
    assert torch.equal(ours["visual.patch_embed.pos_embed"][0], sd["visual.positional_embedding"])
    assert torch.equal(ours["vision_proj.proj.weight"], sd["visual.proj"].t())
    assert torch.equal(ours["text_proj.proj.weight"], sd["text_projection"].t())
    assert torch.equal(ours["text.embed.pos_embed"][0], sd["positional_embedding"])
    assert torch.equal(ours["itc.logit_scale"].reshape(()), sd["logit_scale"])
    for tower, prefix in (("visual", "visual."), ("text", "")):
        for i in range(2):
            block, theirs = f"{tower}.transformer.blocks.{i}", f"{prefix}transformer.resblocks.{i}"
            for ours_name, theirs_name in (
                ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                ("attn.proj.weight", "attn.out_proj.weight"), ("norm1.weight", "ln_1.weight"), ("norm2.bias", "ln_2.bias"),
                ("mlp.fc1.weight", "mlp.c_fc.weight"), ("mlp.fc2.bias", "mlp.c_proj.bias"),
            ):  # fmt: skip
                assert torch.equal(ours[f"{block}.{ours_name}"], sd[f"{theirs}.{theirs_name}"]), (block, ours_name)


def test_custom_text_clip_safetensors_with_text_prefix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf = random_hf_clip()
    save_file(open_clip_state_dict(hf, text_prefix="text."), str(tmp_path / "open_clip.safetensors"))
    model = openai_tiny()
    (report,) = load(model, tmp_path / "open_clip.safetensors")
    assert report.missing == [] and report.unexpected == []
    ids, mask = captions(120, 3)
    _, text_emb, _ = hf_embeddings(hf, torch.randn(1, 3, 32, 32), ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, mask), text_emb, atol=TOL, rtol=0)


def test_layout_and_shape_errors_name_the_fix(tmp_path: Path) -> None:
    torch.save(open_clip_state_dict(random_hf_clip()), tmp_path / "oc.bin")
    with pytest.raises(ValueError, match="has visual.ln_pre: set model.vision.pre_norm=true"):
        load(openai_tiny(vision={"pre_norm": False}), tmp_path / "oc.bin")
    with pytest.raises(ValueError, match="open_clip's text tower is causal: set model.text_causal=true"):
        load(openai_tiny(text_causal=False), tmp_path / "oc.bin")
    wide = openai_tiny(contrastive={"embed_dim": 16})
    shapes = r"shape mismatch for vision_proj\.proj\.weight: model \(16, 64\), checkpoint \(32, 64\)"
    with pytest.raises(ValueError, match=shapes):
        load(wide, tmp_path / "oc.bin")


# ---- CoCa ------------------------------------------------------------------------------------------------
def open_clip_coca_state_dict(vision_width: int, text_width: int, vocab: int, ctx: int, grid: int) -> StateDict:
    """Random tensors under open_clip CoCa's names (its attentional pooler and decoder included)."""
    gen = torch.Generator().manual_seed(3)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.1

    def block(prefix: str, d: int) -> StateDict:
        out = {f"{prefix}.attn.in_proj_weight": r(3 * d, d), f"{prefix}.attn.in_proj_bias": r(3 * d),
               f"{prefix}.attn.out_proj.weight": r(d, d), f"{prefix}.attn.out_proj.bias": r(d),
               f"{prefix}.mlp.c_fc.weight": r(4 * d, d), f"{prefix}.mlp.c_fc.bias": r(4 * d),
               f"{prefix}.mlp.c_proj.weight": r(d, 4 * d), f"{prefix}.mlp.c_proj.bias": r(d)}  # fmt: skip
        for ln in ("ln_1", "ln_2"):
            out |= {f"{prefix}.{ln}.weight": 1 + r(d), f"{prefix}.{ln}.bias": r(d)}
        return out

    v, t = vision_width, text_width
    sd = {"visual.conv1.weight": r(v, 3, 8, 8), "visual.class_embedding": r(v),
          "visual.positional_embedding": r(1 + grid * grid, v), "visual.ln_pre.weight": 1 + r(v),
          "visual.ln_pre.bias": r(v), "visual.attn_pool.query": r(5, t), "visual.attn_pool.attn.q_proj_weight": r(t, t),
          "visual.ln_post.weight": 1 + r(t), "visual.proj": r(t, t),
          "text.token_embedding.weight": r(vocab, t), "text.positional_embedding": r(ctx + 1, t), "text.cls_emb": r(t),
          "text.ln_final.weight": 1 + r(t), "text.ln_final.bias": r(t), "text.text_projection": r(t, t),
          "text_decoder.cross_attn.0.ln_1_kv.weight": r(t), "text_decoder.text_projection": r(t, vocab),
          "logit_scale": torch.tensor(2.5)}  # fmt: skip
    for i in range(2):
        sd |= block(f"visual.transformer.resblocks.{i}", v)
    sd |= block("text.transformer.resblocks.0", t)
    sd |= block("text_decoder.resblocks.0", t)
    return sd


def test_open_clip_coca_maps_vit_and_unimodal_text_and_reports_the_rest(tmp_path: Path) -> None:
    cfg = preset_config("coca", "tiny", vision={"pre_norm": True, "patch_bias": False, "image_size": 32},
                        text={"vocab_size": 120, "max_text_len": 16, "width": 64, "layers": 1},
                        image_pool="attention")  # open_clip's CoCa layout: pooled image, no ViT [CLS]
    model = build_model(cfg)
    sd = open_clip_coca_state_dict(64, 64, 120, 16, grid=4)
    torch.save({"state_dict": sd}, tmp_path / "coca.pt")  # nested, as training scripts save
    (report,) = load(model, tmp_path / "coca.pt")
    ours = model.state_dict()
    assert torch.equal(ours["text_cls_token"], sd["text.cls_emb"])
    assert torch.equal(ours["text_embed.pos_embed"][0], sd["text.positional_embedding"])
    assert torch.equal(ours["text_proj.proj.weight"], sd["text.text_projection"].t())
    assert torch.equal(ours["unimodal.blocks.0.attn.qkv.weight"], sd["text.transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(ours["visual.transformer.blocks.1.mlp.fc2.weight"],
                       sd["visual.transformer.resblocks.1.mlp.c_proj.weight"])
    assert torch.equal(ours["visual.patch_embed.pos_embed"][0], sd["visual.positional_embedding"][1:])
    assert any("[CLS] row dropped" in r for r in report.resized)
    assert set(report.unexpected) == {k for k in sd if k.startswith(("text_decoder.", "visual.attn_pool.",
                                      "visual.ln_post.", "visual.proj", "visual.class_embedding"))}  # fmt: skip
    assert {"vision_proj.proj.weight", "lm_head.decoder.weight", "visual.norm.weight"} <= set(report.missing)
    assert not any(k.startswith(("unimodal.", "text_embed.", "visual.transformer.")) for k in report.missing)
    assert any("text_decoder" in note for note in report.notes)
