"""mmpt CLIP <-> Hugging Face `transformers.CLIPModel` directories (`config.json` + `model.safetensors`).

HF's CLIPModel is OpenAI's CLIP layout: pre-LN blocks, a LayerNorm on the embedded patches (`pre_layrnorm`),
[CLS] pooling after `post_layernorm`, a causal text tower pooled at the EOS token, bias-free projections.
mmpt's CLIP says the same with `vision.pre_norm=true`, `text_causal=true` (presets `clip/openai_b16`,
`clip/openai_tiny`); `quick_gelu` picks the activation HF names `quick_gelu` (else exact `gelu`). A bias on
mmpt's patch convolution has no HF slot but is exported exactly, folded into the patch position embeddings
(conv(x) + b + pos = conv(x) + (pos + b)). HF pools the first `eos_token_id` (legacy id 2: the argmax id);
mmpt the last real token: the same token for right-padded captions that end in one EOS, as mmpt's are.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mmpt.engine.config import ConfigError
from mmpt.interop.key_pairs import KeyPair, export_rules, import_rules, weight_and_bias
from mmpt.models.pretrained import LoadReport, StateDict, apply_rules

logger = logging.getLogger("mmpt")

PRESETS_THAT_EXPORT = "clip/openai_b16 or clip/openai_tiny"
_PATCH_WEIGHT = "vision_model.embeddings.patch_embedding.weight"


# ---- the name table --------------------------------------------------------------------------------------
def _layer_pairs(src: str, dst: str) -> list[KeyPair]:
    """One HF encoder layer <-> one mmpt pre-LN block (q, k, v stacked in mmpt's fused qkv)."""
    pairs = [KeyPair(f"{dst}.attn.qkv.{p}", tuple(f"{src}.self_attn.{n}_proj.{p}" for n in "qkv"))
             for p in ("weight", "bias")]  # fmt: skip
    for ours, theirs in (("norm1", "layer_norm1"), ("attn.proj", "self_attn.out_proj"), ("norm2", "layer_norm2"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):  # fmt: skip
        pairs += weight_and_bias(f"{dst}.{ours}", f"{src}.{theirs}")
    return pairs


def hf_clip_pairs(vision_layers: int, text_layers: int) -> list[KeyPair]:
    """mmpt CLIP keys <-> HF CLIPModel keys."""
    v, t = "vision_model", "text_model"
    pairs = [
        KeyPair("visual.patch_embed.proj.weight", (_PATCH_WEIGHT,)),
        KeyPair("visual.patch_embed.cls_token", (f"{v}.embeddings.class_embedding",), "reshape"),
        KeyPair("visual.patch_embed.pos_embed", (f"{v}.embeddings.position_embedding.weight",), "reshape"),
        *weight_and_bias("visual.norm_pre", f"{v}.pre_layrnorm"),
        *weight_and_bias("visual.norm", f"{v}.post_layernorm"),
        KeyPair("text.embed.token_embed.weight", (f"{t}.embeddings.token_embedding.weight",)),
        KeyPair("text.embed.pos_embed", (f"{t}.embeddings.position_embedding.weight",), "reshape"),
        *weight_and_bias("text.norm", f"{t}.final_layer_norm"),
        KeyPair("vision_proj.proj.weight", ("visual_projection.weight",)),
        KeyPair("text_proj.proj.weight", ("text_projection.weight",)),
        KeyPair("itc.logit_scale", ("logit_scale",), "reshape"),
    ]
    for i in range(vision_layers):
        pairs += _layer_pairs(f"{v}.encoder.layers.{i}", f"visual.transformer.blocks.{i}")
    for i in range(text_layers):
        pairs += _layer_pairs(f"{t}.encoder.layers.{i}", f"text.transformer.blocks.{i}")
    return pairs


def _layers(model: nn.Module) -> tuple[int, int]:
    return len(model.visual.transformer.blocks), len(model.text.transformer.blocks)


# ---- export ----------------------------------------------------------------------------------------------
def hf_export_problems(model: nn.Module) -> list[str]:
    """What HF's CLIPModel cannot express about `model` (empty: it exports exactly)."""
    from mmpt.models.clip import CLIP

    if not isinstance(model, CLIP):
        return [f"HF's CLIPModel holds CLIP only, not {type(model).__name__}"]
    cfg, p = model.config, []
    if not cfg.text_causal:
        p.append("its text tower is bidirectional and pooled at [CLS] (text_causal=false), HF's is causal and pooled "
                 "at EOS (train with model.text_causal=true)")
    if not cfg.text.norm_first:
        p.append("its text tower is post-LN (text.norm_first=false), HF's is pre-LN")
    if not cfg.vision.pre_norm:
        p.append("its ViT has no LayerNorm on the patch embeddings (vision.pre_norm=false), HF's always applies "
                 "pre_layrnorm")
    if model.vision_proj.proj.bias is not None or model.text_proj.proj.bias is not None:
        p.append("its projections have a bias, HF's visual_projection/text_projection have none")
    if cfg.tokens.id("eos") == 2:
        p.append("its EOS id is 2, which HF reads as a legacy config and pools the largest token id instead")
    return p


def hf_clip_config(model: nn.Module) -> Any:
    """The `transformers.CLIPConfig` of an exportable mmpt CLIP."""
    from transformers import CLIPConfig as HFCLIPConfig

    cfg = model.config
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    embed = cfg.contrastive.embed_dim

    def tower(c: Any, blocks: nn.ModuleList) -> dict[str, Any]:
        hidden = blocks[0].mlp.fc1.out_features if len(blocks) else int(c.width * c.mlp_ratio)
        return {"hidden_size": c.width, "intermediate_size": hidden, "num_hidden_layers": c.layers,
                "num_attention_heads": c.heads, "hidden_act": act, "layer_norm_eps": c.norm_eps,
                "attention_dropout": c.dropout, "projection_dim": embed}  # fmt: skip

    text = {**tower(cfg.text, model.text.transformer.blocks), "vocab_size": cfg.text.vocab_size,
            "max_position_embeddings": cfg.text.max_text_len, "pad_token_id": cfg.tokens.id("pad"),
            "bos_token_id": cfg.tokens.id("bos"), "eos_token_id": cfg.tokens.id("eos")}  # fmt: skip
    vision = {**tower(cfg.vision, model.visual.transformer.blocks), "image_size": cfg.vision.image_size,
              "patch_size": cfg.vision.patch_size, "num_channels": model.visual.patch_embed.proj.in_channels}
    return HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=embed,
                        logit_scale_init_value=float(model.itc.scale().detach().log()))


def _export_state(model: nn.Module) -> StateDict:
    """mmpt weights as HF sees them: patch bias folded into the patch positions, the logit scale clamped as
    mmpt's forward clamps it (HF's forward does not)."""
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    bias = sd.pop("visual.patch_embed.proj.bias", None)
    if bias is not None:
        sd["visual.patch_embed.pos_embed"][:, 1:] += bias
    sd["itc.logit_scale"] = model.itc.scale().detach().float().log().reshape(1)
    return sd


def export_hf_clip(model: nn.Module, tokenizer_file: Path | None, out_dir: Path,
                   image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None) -> None:
    """Write `out_dir` as a HF CLIPModel directory (config.json, model.safetensors, and with `tokenizer_file`
    (mmpt's tokenizer.json) the tokenizer as a PreTrainedTokenizerFast; with the run's normalisation
    `image_mean`/`image_std` a CLIPImageProcessor, so `CLIPProcessor.from_pretrained` works too). Raises
    ConfigError when HF's architecture cannot express the model, before writing anything."""
    problems = hf_export_problems(model)
    if problems:
        raise ConfigError(f"cannot export to a Hugging Face CLIPModel: {'; '.join(problems)}. "
                          f"Models built from {PRESETS_THAT_EXPORT} export (or use --format mmpt)")
    try:
        from transformers import CLIPModel as HFCLIPModel
    except ImportError:
        raise ConfigError("exporting a Hugging Face CLIPModel needs the transformers package: "
                          "pip install transformers") from None
    hf_model = HFCLIPModel(hf_clip_config(model)).eval()
    report = LoadReport(source="mmpt model")
    apply_rules(dict(hf_model.state_dict()), export_rules(hf_clip_pairs(*_layers(model))), _export_state(model), report)
    left = [k for k in report.missing if not k.endswith("position_ids")] + report.unexpected
    if left:  # the table and hf_export_problems disagree: a bug, not a user error
        raise RuntimeError(f"HF export left tensors unmapped: {left}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_file is not None:
        from mmpt.interop.hf_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(Path(tokenizer_file), model.config, out_dir)
    if image_mean is not None and image_std is not None:
        save_hf_image_processor(model.config.vision.image_size, image_mean, image_std, out_dir)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    logger.info("exported a Hugging Face CLIPModel (%d tensors) to %s", len(report.mapped), out_dir)


def save_hf_image_processor(image_size: int, mean: Sequence[float], std: Sequence[float], out_dir: Path) -> None:
    """preprocessor_config.json for mmpt's eval transform: shorter side to image_size (bicubic), centre crop,
    /255, normalise. HF resizes then crops where mmpt crops and resizes in one resample, so pixels agree exactly
    only for square inputs (a rounding-level difference otherwise)."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
                       crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                       rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean), image_std=list(std),
                       do_convert_rgb=True).save_pretrained(out_dir)


# ---- import ----------------------------------------------------------------------------------------------
def is_hf_clip_dir(path: str | Path) -> bool:
    """A directory with a config.json of model_type clip (weights: model.safetensors or pytorch_model.bin)."""
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "clip"
    except (json.JSONDecodeError, AttributeError):
        return False


def is_hf_clip_state_dict(sd: StateDict) -> bool:
    return _PATCH_WEIGHT in sd


def _hf_config(source: str | Path) -> dict[str, Any] | None:
    p = Path(source).expanduser()
    file = (p if p.is_dir() else p.parent) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _layout_problems(model: nn.Module, hf: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(errors: the checkpoint would compute something else in this model; notes: small differences)."""
    cfg, errors, notes = model.config, [], []
    if not cfg.text_causal:
        errors.append("HF's text tower is causal and pooled at EOS: set model.text_causal=true")
    if not cfg.vision.pre_norm:
        errors.append("HF's ViT has pre_layrnorm: set model.vision.pre_norm=true")
    if cfg.vision.patch_bias:
        notes.append("HF has no patch-embedding bias: visual.patch_embed.proj.bias stays at its zero init "
                     "(model.vision.patch_bias=false drops it)")
    for name, ours in (("vision", cfg.vision), ("text", cfg.text)):
        theirs = (hf or {}).get(f"{name}_config") or {}
        act = theirs.get("hidden_act", "quick_gelu")  # HF's default for CLIP configs
        if hf is not None and (act == "quick_gelu") != cfg.quick_gelu:
            errors.append(f"the checkpoint's {name}_config.hidden_act is {act!r}: set model.quick_gelu="
                          f"{str(act == 'quick_gelu').lower()}")
        heads = theirs.get("num_attention_heads")
        if heads is not None and heads != ours.heads:
            errors.append(f"the checkpoint has {name}_config.num_attention_heads={heads}: set model.{name}.heads={heads}")
        eps = theirs.get("layer_norm_eps")
        if eps is not None and not math.isclose(eps, ours.norm_eps, rel_tol=1e-6):
            notes.append(f"{name}_config.layer_norm_eps={eps}, model.{name}.norm_eps={ours.norm_eps}")
    return errors, notes


def load_hf_clip(model: nn.Module, sd: StateDict, source: str | Path) -> LoadReport:
    """HF CLIPModel weights (`sd`, read from `source`: a directory or its weights file) into an mmpt CLIP.
    Raises ValueError when the layouts differ in a way that changes the function, or on a shape mismatch."""
    from mmpt.models.clip import CLIP

    if not isinstance(model, CLIP):
        raise ValueError(f"{source} is a Hugging Face CLIPModel, which maps onto arch clip, not {type(model).__name__}")
    errors, notes = _layout_problems(model, _hf_config(source))
    if errors:
        raise ValueError(f"{source} (Hugging Face CLIPModel) does not fit the model: {'; '.join(errors)} "
                         f"(the presets {PRESETS_THAT_EXPORT} have its layout)")
    report = LoadReport(source=str(source), notes=notes)
    apply_rules(dict(model.state_dict()), import_rules(hf_clip_pairs(*_layers(model))), sd, report)
    for note in notes:
        logger.warning("HF CLIPModel from %s: %s", source, note)
    report.log("HF CLIPModel")
    return report
