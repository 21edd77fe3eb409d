"""One name table per foreign layout, used in both directions: a `KeyPair` says which mmpt tensor corresponds
to which foreign tensor(s) and how their layouts differ; `import_rules` / `export_rules` turn the table into
`mmpt.models.pretrained` rules (checked for shape before anything is written, reported in a `LoadReport`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmpt.models.pretrained import Rule

# How a foreign tensor differs from mmpt's: "same" (several foreign tensors = mmpt's, stacked along dim 0, as
# q, k, v in a fused qkv), "reshape" (same values, other leading singleton dims: cls token `d` vs `1 1 d`,
# positions `n d` vs `1 n d`, logit scale `()` vs `(1,)`), "transpose" (open_clip's `x @ proj` matrices `d e`
# vs a Linear weight `e d`).
KINDS = ("same", "reshape", "transpose")


@dataclass(frozen=True)
class KeyPair:
    mmpt: str
    other: tuple[str, ...]
    kind: str = "same"

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind != "same" and len(self.other) != 1):
            raise ValueError(f"KeyPair {self.mmpt}: kind {self.kind!r} must be one of {KINDS} (stacking: 'same' only)")


def _reshaped(tensors: list[torch.Tensor], dst: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    src = tensors[0]
    return (src.reshape(dst.shape) if src.numel() == dst.numel() else src), None


def _transposed(tensors: list[torch.Tensor], _dst: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    return tensors[0].t(), None


def _chunk(index: int, parts: int):  # noqa: ANN202 - a rule transform
    def take(tensors: list[torch.Tensor], _dst: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        return tensors[0].chunk(parts, dim=0)[index], None

    return take


_TRANSFORMS = {"same": None, "reshape": _reshaped, "transpose": _transposed}


def import_rules(pairs: list[KeyPair]) -> list[Rule]:
    """Foreign key(s) -> mmpt key."""
    return [Rule(p.mmpt, p.other, _TRANSFORMS[p.kind]) for p in pairs]


def export_rules(pairs: list[KeyPair]) -> list[Rule]:
    """mmpt key -> foreign key(s); a stacked mmpt tensor is split back into its parts."""
    rules: list[Rule] = []
    for p in pairs:
        if len(p.other) > 1:
            rules += [Rule(name, (p.mmpt,), _chunk(i, len(p.other))) for i, name in enumerate(p.other)]
        else:
            rules.append(Rule(p.other[0], (p.mmpt,), _TRANSFORMS[p.kind]))
    return rules


def weight_and_bias(mmpt: str, other: str) -> list[KeyPair]:
    """`mmpt.{weight,bias}` <- `other.{weight,bias}` (Linear, LayerNorm)."""
    return [KeyPair(f"{mmpt}.{p}", (f"{other}.{p}",)) for p in ("weight", "bias")]
