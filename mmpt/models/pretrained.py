"""Pretrained initialisation from local files: timm ViT weights into `VisionTransformer`, Hugging Face BERT
weights into a post-LN `TextTransformer` (+ an ALBEF-style fusion `Transformer`), and a whole mmpt model
(an earlier run or training stage) by name (`model.init.checkpoint`).

Each loader builds a list of name rules (checkpoint key(s) -> model key), checks every shape before it
writes anything (so a failed load leaves the model untouched), copies the tensors, and logs the whole
mapping plus every missing and unexpected key on the "mmpt" logger: silently half-loaded weights are the
classic way to lose a pretraining run. Nothing is downloaded; paths are local files or directories.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.models.momentum import MomentumTeacher
from mmpt.modules.block import Transformer
from mmpt.modules.encoders import TextTransformer, VisionTransformer

logger = logging.getLogger("mmpt")

StateDict = dict[str, torch.Tensor]
# A rule's transform: (checkpoint tensors in `sources` order, model tensor) -> (new value, resize note or None).
Transform = Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, str | None]]

# File names tried, in order, when a loader is given a directory (HF / timm hub layout).
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
# Containers that training scripts wrap a state dict in (DeiT/timm: "model"; Lightning: "state_dict").
NESTING_KEYS = ("model", "state_dict", "module")


@dataclass
class LoadReport:
    """What a loader did (also logged): tests and callers check it instead of parsing logs."""

    source: str
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key(s), model key), see _join_keys
    missing: list[str] = field(default_factory=list)  # model keys left at their initialisation
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys that were not used
    resized: list[str] = field(default_factory=list)  # "model key: what was done" (interpolated, cropped)
    notes: list[str] = field(default_factory=list)  # config mismatches that do not stop the load

    def log(self, what: str, table: bool = True) -> None:
        """The mapping table (table=False: only its size, for same-name loads), then every missing /
        unexpected key, at INFO."""
        logger.info("pretrained %s from %s: %d tensors mapped", what, self.source, len(self.mapped))
        width = min(max((len(src) for src, _ in self.mapped), default=0), 64)
        for src, dst in self.mapped if table else ():
            logger.info("  %s -> %s", src.ljust(width), dst)
        for key in self.resized:
            logger.info("  resized: %s", key)
        logger.info("  %d missing (left at initialisation)%s", len(self.missing), ":" if self.missing else "")
        for key in self.missing:
            logger.info("    missing: %s", key)
        logger.info("  %d unexpected (not used)%s", len(self.unexpected), ":" if self.unexpected else "")
        for key in self.unexpected:
            logger.info("    unexpected: %s", key)


@dataclass(frozen=True)
class Rule:
    target: str
    sources: tuple[str, ...]
    transform: Transform | None = None  # None: the tensor itself, or several concatenated along dim 0


# ---- reading files -----------------------------------------------------------------------------------------
def _checkpoint_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"pretrained weights not found: {p}")
    if p.is_dir():
        for name in CHECKPOINT_FILES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no checkpoint in directory {p} (looked for {', '.join(CHECKPOINT_FILES)})")
    return p


def read_state_dict(path: str | Path) -> StateDict:
    """A local checkpoint (`.safetensors`, or a torch file, possibly nested under "model"/"state_dict")
    -> flat name -> tensor dict on the CPU, "module." (DDP) prefixes removed."""
    file = _checkpoint_file(path)
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {file} needs the safetensors package (pip install safetensors)") from e
        obj: object = load_file(str(file), device="cpu")
    else:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # e.g. a training checkpoint that pickled its argparse args
            raise ValueError(
                f"{file} holds more than tensors and is not loaded with weights_only=False (it could run code); "
                "re-save only its state dict: torch.save(torch.load(f, weights_only=False)['model'], out)"
            ) from e
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file} does not hold a state dict (got {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{file} holds no tensors (top-level keys: {sorted(obj)[:10]})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


# ---- applying rules ----------------------------------------------------------------------------------------
def _join_keys(keys: tuple[str, ...]) -> str:
    """("a.query.w", "a.key.w") -> "a.{query,key}.w": several sources stacked into one model tensor."""
    if len(keys) == 1:
        return keys[0]
    parts = [k.split(".") for k in keys]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) - tail - 1 > head and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middle = ",".join(".".join(p[head : len(p) - tail]) for p in parts)
    return ".".join([*parts[0][:head], "{" + middle + "}", *parts[0][len(parts[0]) - tail :]])


def _default_transform(tensors: list[torch.Tensor], _dst: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    return (tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)), None


def apply_rules(targets: StateDict, rules: list[Rule], sd: StateDict, report: LoadReport) -> None:
    """Check every rule, then copy. A rule whose sources are all absent is skipped (its target stays
    missing); one whose target the model lacks is skipped (its sources stay unexpected)."""
    pending: StateDict = {}
    used: set[str] = set()
    for rule in rules:
        present = [k for k in rule.sources if k in sd]
        if not present or rule.target not in targets:
            continue
        if len(present) != len(rule.sources):
            absent = [k for k in rule.sources if k not in sd]
            raise ValueError(f"checkpoint has {present} but not {absent}, which {rule.target} needs as well")
        dst = targets[rule.target]
        src_name = _join_keys(rule.sources)
        value, note = (rule.transform or _default_transform)([sd[k] for k in rule.sources], dst)
        if value.shape != dst.shape:
            shapes = ", ".join(f"{k} {tuple(sd[k].shape)}" for k in rule.sources)
            raise ValueError(
                f"shape mismatch for {rule.target}: model {tuple(dst.shape)}, checkpoint {tuple(value.shape)} "
                f"(from {shapes}); build the model with the checkpoint's sizes"
            )
        pending[rule.target] = value
        used.update(rule.sources)
        report.mapped.append((src_name, rule.target))
        if note is not None:
            report.resized.append(f"{rule.target}: {note}")
    with torch.no_grad():
        for name, value in pending.items():
            targets[name].copy_(value.to(dtype=targets[name].dtype))
    report.missing = [k for k in targets if k not in pending]
    report.unexpected = [k for k in sd if k not in used]


def _targets(**modules: nn.Module | None) -> StateDict:
    """Model tensors by prefixed name; state_dict() tensors share storage, so copy_ writes the parameters."""
    return {f"{prefix}.{k}": v for prefix, m in modules.items() if m is not None for k, v in m.state_dict().items()}


# ---- timm ViT ----------------------------------------------------------------------------------------------
def _prefix_tokens(length: int, preferred: int) -> int:
    """How many non-grid tokens (cls, dist, registers) a position table of `length` rows has."""
    for p in (preferred, *range(0, 9)):
        if length - p >= 0 and math.isqrt(length - p) ** 2 == length - p:
            return p
    raise ValueError(f"pos_embed with {length} positions is not prefix tokens + a square grid")


def resize_pos_embed(
    src: torch.Tensor, dst: torch.Tensor, num_prefix: int, antialias: bool = True
) -> tuple[torch.Tensor, str | None]:
    """`1 (p + g*g) d` -> the shape of `dst` (whose first `num_prefix` rows are cls-like tokens): prefix
    tokens kept, the grid resampled bicubically, so 224 px weights fit a 256 px model. antialias=True is
    timm's `resample_abs_pos_embed`; False is ALBEF's official `interpolate_pos_embed` (plain bicubic)."""
    if src.shape == dst.shape:
        return src, None
    p_src = _prefix_tokens(src.shape[1], num_prefix) if src.ndim == 3 else -1
    g_dst = math.isqrt(dst.shape[1] - num_prefix)
    if p_src != num_prefix or src.shape[-1] != dst.shape[-1] or g_dst**2 != dst.shape[1] - num_prefix:
        raise ValueError(
            f"shape mismatch for pos_embed: checkpoint {tuple(src.shape)} ({p_src} prefix tokens), model "
            f"{tuple(dst.shape)} ({num_prefix} prefix tokens); widths and cls/dist tokens must agree"
        )
    g_src = math.isqrt(src.shape[1] - p_src)
    grid = src[:, p_src:].float().reshape(1, g_src, g_src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_dst, g_dst), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_dst * g_dst, -1).to(src.dtype)
    return torch.cat([src[:, :p_src], grid], dim=1), f"grid {g_src}x{g_src} -> {g_dst}x{g_dst} (bicubic)"


def _timm_rules(vit: VisionTransformer, antialias: bool) -> list[Rule]:
    num_prefix = 1 if vit.patch_embed.cls_token is not None else 0

    def pos_transform(tensors: list[torch.Tensor], dst: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        return resize_pos_embed(tensors[0], dst, num_prefix, antialias)

    rules = [
        Rule("patch_embed.cls_token", ("cls_token",)),
        Rule("patch_embed.pos_embed", ("pos_embed",), pos_transform),
    ]
    for p in ("weight", "bias"):
        rules += [
            Rule(f"patch_embed.proj.{p}", (f"patch_embed.proj.{p}",)),
            Rule(f"norm.{p}", (f"norm.{p}",)),
        ]
        for i in range(len(vit.transformer.blocks)):
            src, dst = f"blocks.{i}", f"transformer.blocks.{i}"
            rules += [
                Rule(f"{dst}.{name}.{p}", (f"{src}.{name}.{p}",))
                for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
            ]
    return rules


def load_timm_vit(vit: VisionTransformer, path: str | Path, pos_antialias: bool = True) -> LoadReport:
    """Load timm `VisionTransformer` weights (pre-LN, same block layout as ours) from a local file or
    directory. pos_embed is resampled when the grid differs (`resize_pos_embed`; pos_antialias=False
    matches ALBEF's official code); heads (`head.*`, `fc_norm`) are unexpected.

    Build `vit` with the checkpoint's width/depth/patch size and `norm_eps=1e-6` (timm's) to reproduce
    timm exactly; a different eps only perturbs the function slightly and cannot be detected from the file.
    """
    sd = read_state_dict(path)
    report = LoadReport(source=str(path))
    apply_rules(dict(vit.state_dict()), _timm_rules(vit, pos_antialias), sd, report)
    report.log("timm ViT")
    return report


# ---- Hugging Face BERT -------------------------------------------------------------------------------------
def _bert_key(key: str) -> str:
    """Normalise a BERT checkpoint key: drop the `bert.` model prefix, old `gamma`/`beta` LayerNorm names."""
    key = key.removeprefix("bert.")
    if key.endswith("LayerNorm.gamma"):
        return key.removesuffix("gamma") + "weight"
    if key.endswith("LayerNorm.beta"):
        return key.removesuffix("beta") + "bias"
    return key


def _bert_layer_rules(src: str, dst: str) -> list[Rule]:
    """One BERT layer (post-LN) onto one of our blocks; q, k, v stacked in our fused qkv's order."""
    rules: list[Rule] = []
    for p in ("weight", "bias"):
        qkv = tuple(f"{src}.attention.self.{n}.{p}" for n in ("query", "key", "value"))
        kv = tuple(f"{src}.crossattention.self.{n}.{p}" for n in ("key", "value"))
        rules += [
            Rule(f"{dst}.attn.qkv.{p}", qkv),
            Rule(f"{dst}.attn.proj.{p}", (f"{src}.attention.output.dense.{p}",)),
            Rule(f"{dst}.norm1.{p}", (f"{src}.attention.output.LayerNorm.{p}",)),
            Rule(f"{dst}.cross_attn.q.{p}", (f"{src}.crossattention.self.query.{p}",)),
            Rule(f"{dst}.cross_attn.kv.{p}", kv),
            Rule(f"{dst}.cross_attn.proj.{p}", (f"{src}.crossattention.output.dense.{p}",)),
            Rule(f"{dst}.norm_cross.{p}", (f"{src}.crossattention.output.LayerNorm.{p}",)),
            Rule(f"{dst}.mlp.fc1.{p}", (f"{src}.intermediate.dense.{p}",)),
            Rule(f"{dst}.mlp.fc2.{p}", (f"{src}.output.dense.{p}",)),
            Rule(f"{dst}.norm2.{p}", (f"{src}.output.LayerNorm.{p}",)),
        ]
    return rules


def _bert_positions(tensors: list[torch.Tensor], dst: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """position_embeddings (+ token_type_embeddings[0], constant for single-segment text) -> pos_embed."""
    pos = tensors[0]
    max_len = dst.shape[1]
    if pos.ndim != 2 or pos.shape[0] < max_len:
        raise ValueError(
            f"shape mismatch for embeddings.position_embeddings.weight: checkpoint {tuple(pos.shape)} has fewer "
            f"than the model's max_len={max_len} positions"
        )
    value = pos[:max_len] + (tensors[1][0] if len(tensors) > 1 else 0)
    note = f"positions cropped {pos.shape[0]} -> {max_len}" if pos.shape[0] > max_len else None
    return value.unsqueeze(0), note


def _bert_config_notes(path: str | Path, text_encoder: TextTransformer, fusion: Transformer | None) -> list[str]:
    """Compare config.json (if any) with the model: wrong head count changes the function with matching
    shapes, so it is an error; eps / activation differences are reported."""
    p = Path(path).expanduser()
    cfg_file = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg_file.is_file():
        return []
    cfg = json.loads(cfg_file.read_text())
    notes: list[str] = []
    blocks = [*text_encoder.transformer.blocks, *(fusion.blocks if fusion is not None else [])]
    heads = cfg.get("num_attention_heads")
    if heads is not None and any(b.attn.num_heads != heads for b in blocks):
        ours = sorted({b.attn.num_heads for b in blocks})
        raise ValueError(f"checkpoint has num_attention_heads={heads}, the model {ours}: build it with {heads} heads")
    eps = cfg.get("layer_norm_eps")
    norm = text_encoder.embed.norm
    if eps is not None and norm is not None and not math.isclose(norm.eps, eps, rel_tol=1e-6):
        notes.append(f"layer_norm_eps: checkpoint {eps}, model {norm.eps} (build with norm_eps={eps} to match)")
    act = cfg.get("hidden_act")
    if act is not None and act != "gelu":
        notes.append(f"hidden_act={act!r}: the model uses exact GELU")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        notes.append(f"position_embedding_type={cfg['position_embedding_type']!r}: the model uses absolute positions")
    return notes


def load_hf_bert(
    text_encoder: TextTransformer,
    fusion: Transformer | None,
    path: str | Path,
    text_layers: int | None = None,
) -> LoadReport:
    """Load a local Hugging Face BERT checkpoint (directory or file; keys with or without `bert.`) into a
    post-LN text encoder (BERT layers 0..text_layers-1) and fusion stack (the layers after them).

    Fusion cross-attention stays missing (randomly initialised, as ALBEF does) unless the checkpoint has
    `crossattention` weights (BertLMHeadModel with add_cross_attention). Pooler / MLM-head keys and layers
    beyond the two stacks are unexpected. token_type_embeddings[0] is folded into the position embeddings.
    """
    stacks = (("text_encoder", text_encoder), ("fusion", fusion))
    bad = [name for name, m in stacks if m is not None and getattr(m, "norm_first", True)]
    if bad:
        raise ValueError(
            f"load_hf_bert: {' and '.join(bad)} is pre-LN, but BERT is post-LN, so its weights would not "
            "reproduce BERT; build the text tower post-LN: TextTransformer(..., norm_first=False) and "
            "Transformer(..., norm_first=False) for the fusion layers"
        )
    n_text = len(text_encoder.transformer.blocks)
    if text_layers is not None and text_layers != n_text:
        raise ValueError(f"text_layers={text_layers} but the text encoder has {n_text} layers")
    sd = {_bert_key(k): v for k, v in read_state_dict(path).items()}
    notes = _bert_config_notes(path, text_encoder, fusion)

    pos_sources = ("embeddings.position_embeddings.weight",)
    if "embeddings.token_type_embeddings.weight" in sd:
        pos_sources += ("embeddings.token_type_embeddings.weight",)
    rules = [
        Rule("text_encoder.embed.token_embed.weight", ("embeddings.word_embeddings.weight",)),
        Rule("text_encoder.embed.pos_embed", pos_sources, _bert_positions),
        *(Rule(f"text_encoder.embed.norm.{p}", (f"embeddings.LayerNorm.{p}",)) for p in ("weight", "bias")),
    ]
    for i in range(n_text):
        rules += _bert_layer_rules(f"encoder.layer.{i}", f"text_encoder.transformer.blocks.{i}")
    for j in range(len(fusion.blocks) if fusion is not None else 0):
        rules += _bert_layer_rules(f"encoder.layer.{n_text + j}", f"fusion.blocks.{j}")

    report = LoadReport(source=str(path), notes=notes)
    apply_rules(_targets(text_encoder=text_encoder, fusion=fusion), rules, sd, report)
    for note in notes:
        logger.warning("pretrained BERT from %s: %s", path, note)
    report.log("HF BERT")
    return report


# ---- an mmpt model (an earlier run or stage) -------------------------------------------------------------
def load_model_state(model: nn.Module, sd: StateDict, source: str) -> LoadReport:
    """Same-name, non-strict load of a whole-model state dict (parameters and persistent buffers).

    For stage chaining: the next stage may add modules (missing: left at initialisation) or drop some
    (unexpected: ignored), but a tensor whose shape differs means a different architecture size, so every
    shape is checked first and any mismatch raises before anything is written.
    """
    targets = dict(model.state_dict())
    report = LoadReport(source=source)
    apply_rules(targets, [Rule(name, (name,)) for name in targets], sd, report)
    report.log("model", table=False)
    return report


@dataclass
class InitConfig:
    """`model.init`: weights that replace the random initialisation before training.

    Order: `checkpoint` first (the previous stage's whole model), then `vision` / `text`, which override the
    towers they load, so a later stage can restart one tower from a released checkpoint on purpose.
    """

    # mmpt run dir, checkpoints/step_* tag dir, a .pt/.safetensors state dict (mmpt's, or open_clip's CLIP/CoCa),
    # or a Hugging Face CLIPModel directory (mmpt/interop)
    checkpoint: Optional[str] = None
    vision: Optional[str] = None  # timm-style ViT state dict (file or directory) -> model.visual
    text: Optional[str] = None  # Hugging Face BERT checkpoint -> the model's text (+ fusion) layers
    # a later training stage: refuse to train without `checkpoint` (a `???` in a preset cannot say it, since the
    # typed model presets already set checkpoint: null underneath)
    checkpoint_required: bool = False


def apply_init(
    model: nn.Module, init: InitConfig, read_checkpoint: Callable[[str], StateDict] = read_state_dict
) -> list[LoadReport]:
    """Load `init.checkpoint`, then `init.vision` / `init.text`, into a freshly built model (each load logs its
    count and every missing/unexpected key).

    `read_checkpoint` turns `init.checkpoint` into a state dict; the default reads plain files, the trainer
    passes one that also resolves DeepSpeed run/tag dirs (that lives in mmpt.engine, which models must not
    import). A momentum teacher is re-synced to the student afterwards unless the checkpoint provided every
    teacher tensor and no tower init changed the student since.
    """
    reports = []
    teachers = {name: m for name, m in model.named_modules() if isinstance(m, MomentumTeacher)}
    teacher_loaded = False
    if init.checkpoint:
        from mmpt.interop import load_foreign_state  # HF CLIPModel / open_clip layouts; imports this module

        sd = read_checkpoint(init.checkpoint)
        report = load_foreign_state(model, sd, init.checkpoint) or load_model_state(model, sd, init.checkpoint)
        reports.append(report)
        teacher_loaded = not any(key.startswith(f"{name}.") for key in report.missing for name in teachers)
    if init.vision:
        teacher_loaded = False
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"model.init.vision: {type(model).__name__} has no ViT tower (`visual`) to load into")
        reports.append(load_timm_vit(visual, init.vision))
    if init.text:
        teacher_loaded = False
        targets = getattr(model, "bert_init_targets", None)
        if targets is None:
            raise ValueError(f"model.init.text: {type(model).__name__} has no BERT-shaped text tower to load into")
        text_encoder, fusion = targets()
        reports.append(load_hf_bert(text_encoder, fusion, init.text))
    if reports and not teacher_loaded:
        for teacher in teachers.values():
            teacher.update(momentum=0.0)  # teacher = student: it was deep-copied from the random weights
    return reports
