"""Keys every architecture's `model.*` config shares: which arch, where its starting weights come from, and
which parameters train, and how ITC treats duplicate pairs.

They live in one base class so that every architecture (CLIP, ALBEF, CoCa, VLMo, BEiT-3, ...) accepts the
same `model.init` / `model.freeze` / `model.train` overrides and the trainer applies them the same way;
stagewise recipes (VLMo: vision, then text with frozen attention, then everything) are only configs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmpt.models.pretrained import InitConfig


@dataclass
class ModelConfigBase:
    """Subclasses redefine `arch` with their registered name; all other fields keep these defaults.

    freeze / train are fnmatch patterns over `model.named_parameters()` names (`*` also crosses dots, so
    `visual.*` is the whole vision tower): a parameter trains iff (`train` is empty or it matches a `train`
    pattern) and it matches no `freeze` pattern. Parameters the model keeps frozen itself (a momentum
    teacher) never train. See mmpt/models/freezing.py.
    """

    arch: str = ""
    init: InitConfig = field(default_factory=InitConfig)  # starting weights from local files / earlier runs
    freeze: list[str] = field(default_factory=list)  # e.g. ["visual.*", "text.embed.*"]
    train: list[str] = field(default_factory=list)  # empty = everything not frozen; e.g. ["*.mlp_text.*"]
    # ITC: pairs that share an image id or have an identical caption are positives (the target spread over
    # them), not negatives -- as ALBEF's retrieval fine-tuning does with image ids. Off = the papers' loss.
    itc_duplicate_positives: bool = False
