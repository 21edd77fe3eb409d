"""Weights in other projects' layouts: Hugging Face `CLIPModel` directories (export and import) and open_clip
CLIP / CoCa state dicts (import), mapped onto mmpt's CLIP / CoCa with the rule tables of
`mmpt.models.pretrained` (every shape checked before anything is written, a `LoadReport` of what was mapped).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from mmpt.models.pretrained import LoadReport, StateDict


def load_foreign_state(model: nn.Module, sd: StateDict, source: str | Path) -> LoadReport | None:
    """`model.init.checkpoint` in another project's naming -> a mapped load; None when `sd` is not one (then
    it is an mmpt state dict, loaded by name)."""
    from mmpt.interop import hf_clip, open_clip

    if hf_clip.is_hf_clip_state_dict(sd):
        return hf_clip.load_hf_clip(model, sd, source)
    if open_clip.is_open_clip_state_dict(sd):
        return open_clip.load_open_clip(model, sd, source)
    return None
