"""open_clip CLIP / CoCa state dicts (`*.pt`, `*.bin`, `*.safetensors`) -> mmpt's CLIP / CoCa.

open_clip's names (OpenAI's): `visual.conv1`, `visual.class_embedding`, `visual.positional_embedding`,
`visual.ln_pre`, `visual.transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}`, `visual.ln_post`, `visual.proj` (`d e`, applied as x @ proj), `token_embedding`,
`positional_embedding`, `transformer.resblocks...`, `ln_final`, `text_projection` (`d e`), `logit_scale`;
CustomTextCLIP and CoCa keep the text tower under `text.`, CoCa its decoder under `text_decoder.`.
`in_proj_weight` is q, k, v stacked in mmpt's own fused-qkv order, so blocks map one to one.

A state dict records neither the activation nor the head count: the model's are used and named in the
report (OpenAI-pretrained weights need model.quick_gelu=true; open_clip's own trainings use exact GELU
unless the model name ends in -quickgelu). CoCa: the ViT (positions without the [CLS] row, which mmpt's
CoCa ViT does not have: approximate) and the unimodal text tower with its appended [CLS] (exact for
captions that fill the context; open_clip places [CLS] after the padding, mmpt after the last real token)
map; the attentional pooler (at the embedding width, its own heads) and the decoder (a separate
cross-attention block with its own MLP per layer) have no counterpart in mmpt's CoCa and stay unexpected.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mmpt.interop.key_pairs import KeyPair, import_rules, weight_and_bias
from mmpt.models.pretrained import LoadReport, StateDict, apply_rules, Rule

logger = logging.getLogger("mmpt")


def is_open_clip_state_dict(sd: StateDict) -> bool:
    return any(k.startswith("visual.transformer.resblocks.") for k in sd) or "visual.class_embedding" in sd


def _block_pairs(src: str, dst: str, layers: int) -> list[KeyPair]:
    """open_clip `src.resblocks.N` (ResidualAttentionBlock) <-> mmpt `dst.blocks.N` (pre-LN Block)."""
    pairs: list[KeyPair] = []
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}", f"{dst}.blocks.{i}"
        pairs += [KeyPair(f"{d}.attn.qkv.weight", (f"{s}.attn.in_proj_weight",)),
                  KeyPair(f"{d}.attn.qkv.bias", (f"{s}.attn.in_proj_bias",))]  # fmt: skip
        for ours, theirs in (("norm1", "ln_1"), ("attn.proj", "attn.out_proj"), ("norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
            pairs += weight_and_bias(f"{d}.{ours}", f"{s}.{theirs}")
    return pairs


def _vit_pairs(model: nn.Module) -> list[KeyPair]:
    vit = model.visual
    pairs = [KeyPair("visual.patch_embed.proj.weight", ("visual.conv1.weight",)),
             *weight_and_bias("visual.norm_pre", "visual.ln_pre"),
             *_block_pairs("visual.transformer", "visual.transformer", len(vit.transformer.blocks))]  # fmt: skip
    if vit.patch_embed.cls_token is not None:  # CLIP: [CLS] pooled after ln_post, then x @ proj
        pairs += [KeyPair("visual.patch_embed.cls_token", ("visual.class_embedding",), "reshape"),
                  KeyPair("visual.patch_embed.pos_embed", ("visual.positional_embedding",), "reshape"),
                  *weight_and_bias("visual.norm", "visual.ln_post"),
                  KeyPair("vision_proj.proj.weight", ("visual.proj",), "transpose")]  # fmt: skip
    return pairs


def _clip_pairs(model: nn.Module, text: str) -> list[KeyPair]:
    """`text`: "" (CLIP: text keys at the top level) or "text." (CustomTextCLIP)."""
    return [*_vit_pairs(model),
            KeyPair("text.embed.token_embed.weight", (f"{text}token_embedding.weight",)),
            KeyPair("text.embed.pos_embed", (f"{text}positional_embedding",), "reshape"),
            *_block_pairs(f"{text}transformer", "text.transformer", len(model.text.transformer.blocks)),
            *weight_and_bias("text.norm", f"{text}ln_final"),
            KeyPair("text_proj.proj.weight", (f"{text}text_projection",), "transpose"),
            KeyPair("itc.logit_scale", ("logit_scale",), "reshape")]  # fmt: skip


def _coca_pairs(model: nn.Module) -> list[KeyPair]:
    return [*_vit_pairs(model),
            KeyPair("text_embed.token_embed.weight", ("text.token_embedding.weight",)),
            KeyPair("text_embed.pos_embed", ("text.positional_embedding",), "reshape"),
            KeyPair("text_cls_token", ("text.cls_emb",)),
            *_block_pairs("text.transformer", "unimodal", len(model.unimodal.blocks)),
            *weight_and_bias("text_norm", "text.ln_final"),
            KeyPair("text_proj.proj.weight", ("text.text_projection",), "transpose"),
            KeyPair("itc.logit_scale", ("logit_scale",), "reshape")]  # fmt: skip


def _drop_cls_row(tensors: list[torch.Tensor], dst: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """open_clip positions `(1 + n) d` -> mmpt CoCa's `1 n d` (no [CLS] token): the [CLS] row is dropped."""
    src = tensors[0]
    if src.ndim == 2 and src.shape[0] == dst.shape[1] + 1:
        return src[1:].unsqueeze(0), "[CLS] row dropped (mmpt's CoCa ViT has none): approximate"
    return src, None


def _layout_errors(model: nn.Module, sd: StateDict, text_causal: bool) -> list[str]:
    errors = []
    has_pre = "visual.ln_pre.weight" in sd
    if has_pre != (model.visual.norm_pre is not None):
        errors.append(f"the checkpoint {'has' if has_pre else 'has no'} visual.ln_pre: set model.vision.pre_norm="
                      f"{str(has_pre).lower()}")
    if not text_causal:
        errors.append("open_clip's text tower is causal: set model.text_causal=true")
    biased = [k for k in ("text_projection.bias", "text.text_projection.bias") if k in sd]
    if biased:
        errors.append(f"{biased[0]}: mmpt's projections have no bias")
    return errors


def load_open_clip(model: nn.Module, sd: StateDict, source: str | Path) -> LoadReport:
    """Map an open_clip CLIP / CoCa state dict onto an mmpt CLIP / CoCa (see the module doc for what maps).
    Raises ValueError when the layouts differ in a way that changes the function, or on a shape mismatch."""
    from mmpt.models.clip import CLIP
    from mmpt.models.coca import CoCa

    cfg = getattr(model, "config", None)
    if isinstance(model, CLIP):
        kind, text_causal = "CLIP", cfg.text_causal
        pairs = _clip_pairs(model, "text." if any(k.startswith("text.transformer.") for k in sd) else "")
    elif isinstance(model, CoCa):
        if cfg.layout != "mmpt":  # its [CLS] ViT and shared pooler would map ln_post/proj onto the wrong tensors
            raise ValueError(f"{source}: loading open_clip CoCa weights needs model.layout=mmpt (layout={cfg.layout} "
                             "is not mapped yet)")
        kind, text_causal, pairs = "CoCa", True, _coca_pairs(model)
    else:
        raise ValueError(f"{source} is an open_clip state dict, which maps onto arch clip or coca, "
                         f"not {type(model).__name__}")
    errors = _layout_errors(model, sd, text_causal)
    if errors:
        raise ValueError(f"{source} (open_clip {kind}) does not fit the model: {'; '.join(errors)} "
                         "(clip/openai_b16 and clip/openai_tiny have OpenAI's layout)")
    rules = import_rules(pairs)
    if kind == "CoCa":
        rules.append(Rule("visual.patch_embed.pos_embed", ("visual.positional_embedding",), _drop_cls_row))
    acts = "quick-GELU" if getattr(cfg, "quick_gelu", False) else "exact GELU"
    notes = [f"open_clip state dicts record no activation or head count: loaded as {acts}, vision.heads="
             f"{cfg.vision.heads}, text.heads={cfg.text.heads} (OpenAI weights need model.quick_gelu=true)"]
    if "visual.conv1.bias" not in sd and model.visual.patch_embed.proj.bias is not None:
        notes.append("open_clip has no patch-embedding bias: it stays at its zero init (model.vision.patch_bias=false)")
    if kind == "CoCa":
        notes.append("open_clip's attentional pooler, ln_post, visual.proj and text_decoder.* have no exact counterpart "
                     "in mmpt's CoCa: left at initialisation (the poolers, vision_proj, the multimodal decoder)")
    report = LoadReport(source=str(source), notes=notes)
    apply_rules(dict(model.state_dict()), rules, sd, report)
    for note in notes:
        logger.warning("open_clip %s from %s: %s", kind, source, note)
    report.log(f"open_clip {kind}")
    return report
