"""`model.freeze` / `model.train`: choose the trainable parameters by name pattern, before the optimizer exists.

Stagewise recipes (VLMo: train the vision expert, then the text expert with frozen attention, then all) are
configs, not code: fnmatch patterns over `model.named_parameters()` names. A parameter trains iff
(`train` is empty or it matches a `train` pattern) and it matches no `freeze` pattern. Freezing only ever
turns `requires_grad` off: parameters the model keeps frozen itself (a momentum teacher) never train.

Tied weights (the MLM head sharing the word embedding) appear once, under their first name, exactly as the
optimizer and the no-decay rule see them. The optimizer is built from `requires_grad` parameters
(mmpt/engine/optim.py), so frozen ones never reach it or DeepSpeed's ZeRO partitions, yet they stay in
the module state dict and every checkpoint.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from mmpt.models.momentum import MomentumTeacher


@dataclass(frozen=True)
class ParamCounts:
    """Element counts; `teacher` is the part of `frozen` held by momentum teachers."""

    trainable: int
    frozen: int
    teacher: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def summary(self) -> str:
        """One log line: both counts in millions with their share of the total."""
        share = 100.0 / max(1, self.total)
        teacher = f", momentum teacher {self.teacher / 1e6:.2f}M" if self.teacher else ""
        return (
            f"params {self.total / 1e6:.2f}M | trainable {self.trainable / 1e6:.2f}M ({self.trainable * share:.1f}%) "
            f"| frozen {self.frozen / 1e6:.2f}M ({self.frozen * share:.1f}%{teacher})"
        )


def parameter_counts(model: nn.Module) -> ParamCounts:
    """Trainable vs frozen elements (works on the meta device); shared tensors counted once."""
    teacher_ids = {id(p) for m in model.modules() if isinstance(m, MomentumTeacher) for p in m.parameters()}
    trainable = frozen = teacher = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
            teacher += p.numel() if id(p) in teacher_ids else 0
    return ParamCounts(trainable, frozen, teacher)


def wanted_trainable(name: str, train: Sequence[str], freeze: Sequence[str]) -> bool:
    """The pattern rule alone (before the model's own frozen parameters are taken into account)."""
    selected = not train or any(fnmatchcase(name, pat) for pat in train)
    return selected and not any(fnmatchcase(name, pat) for pat in freeze)


def freeze_idle(model: nn.Module, patterns: Sequence[str]) -> None:
    """Freeze, at build time, what no configured objective can train (same patterns as `model.freeze`; a
    pattern may match nothing, e.g. an expert a layout lacks): no optimizer state, no weight decay drift."""
    for name, p in model.named_parameters():
        if any(fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)


def name_hints(pattern: str, names: Iterable[str], n: int = 3) -> str:
    """' Did you mean ...? Top-level names: ...' from the real names and their module prefixes (`a.b.*`)."""
    names = list(names)
    prefixes: set[str] = set()
    for name in names:
        parts = name.split(".")
        prefixes.update(".".join(parts[:i]) + ".*" for i in range(1, len(parts)))
    close = difflib.get_close_matches(pattern, sorted(prefixes) + names, n=n, cutoff=0.5)
    top = sorted({name.split(".")[0] + ".*" if "." in name else name for name in names})
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} Top-level names: {', '.join(top[:12])}{', ...' if len(top) > 12 else ''}."


def check_patterns(model: nn.Module, train: Sequence[str], freeze: Sequence[str]) -> None:
    """Raise ValueError for a pattern that matches no parameter, a `train` pattern that matches only
    parameters the model keeps frozen, or a selection that leaves nothing to train."""
    params = dict(model.named_parameters())
    problems = []
    for key, patterns in (("model.train", train), ("model.freeze", freeze)):
        for pat in patterns:
            matched = [name for name in params if fnmatchcase(name, pat)]
            if not matched:
                problems.append(f"{key} pattern {pat!r} matches no parameter.{name_hints(pat, params)}")
            elif key == "model.train" and not any(params[name].requires_grad for name in matched):
                problems.append(
                    f"{key} pattern {pat!r} matches only parameters the model keeps frozen itself (e.g. "
                    f"{matched[0]!r}: a momentum teacher, updated outside the optimizer); remove it."
                )
    if problems:
        raise ValueError(" ".join(problems) + " Patterns are fnmatch over model.named_parameters() names.")
    if not any(p.requires_grad and wanted_trainable(n, train, freeze) for n, p in params.items()):
        raise ValueError(
            f"model.train={list(train)} / model.freeze={list(freeze)} freeze every parameter: nothing would train. "
            "Narrow model.freeze or widen model.train"
        )


def apply_freeze(model: nn.Module, train: Sequence[str] = (), freeze: Sequence[str] = ()) -> ParamCounts:
    """Check the patterns, then turn `requires_grad` off for every parameter they exclude (never on).

    Call on the built model before the optimizer / DeepSpeed engine; returns the resulting counts.
    """
    if train or freeze:
        check_patterns(model, train, freeze)
        for name, param in model.named_parameters():
            if not wanted_trainable(name, train, freeze):
                param.requires_grad_(False)
    return parameter_counts(model)
