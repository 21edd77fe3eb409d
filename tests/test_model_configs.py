"""Model configs are composed of shared pieces: every setting is declared in one dataclass, presets have one
source (the Python preset the YAML names), and what the YAML states is only the data links."""
from __future__ import annotations

import typing
from collections import defaultdict
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmpt.cli.common import CONF_DIR
from mmpt.engine.config import resolve, typed_config
from mmpt.models.pretrained import InitConfig
from mmpt.models.registry import arch_entry, arch_names, build_model, preset_config
from mmpt.visual_tokenizer import VisualTokenizerConfig

# Component configs of their own (where weights come from, the MIM target tokenizer): their keys name other
# things (`init.vision` is a weights path, not a tower) and are not part of the model's geometry.
COMPONENTS = (InitConfig, VisualTokenizerConfig)


def own_fields(cls: type) -> set[str]:
    """Fields a dataclass declares itself (not inherited, not ClassVar)."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    return {n for n in own if typing.get_origin(hints.get(n)) is not typing.ClassVar}


def config_classes() -> set[type]:
    """Every dataclass an architecture config is made of: the arch configs, their bases, their nested pieces."""
    todo = [arch_entry(a).config_cls for a in arch_names()]
    seen: set[type] = set()
    while todo:
        cls = todo.pop()
        if cls in seen or cls in COMPONENTS:
            continue
        seen.add(cls)
        todo += [base for base in cls.__mro__[1:] if is_dataclass(base)]
        hints = typing.get_type_hints(cls)
        todo += [t for f in fields(cls) if isinstance(t := hints[f.name], type) and is_dataclass(t)]
    return seen


def test_every_field_is_declared_in_one_dataclass() -> None:
    declared: dict[str, list[str]] = defaultdict(list)
    for cls in config_classes():
        for name in own_fields(cls):
            declared[name].append(cls.__name__)
    twice = {name: owners for name, owners in declared.items() if len(owners) > 1}
    assert not twice, f"fields declared in more than one config dataclass: {twice}"
    assert {"image_size", "width", "embed_dim", "objectives", "pad"} <= set(declared)  # the walk saw the pieces


@pytest.mark.parametrize("arch", arch_names())
def test_yaml_presets_name_their_python_preset_and_state_only_data_links(arch: str) -> None:
    """mmpt/conf/model/<arch>/<preset>.yaml composes to exactly the Python preset (at the preset's own geometry)."""
    for path in sorted((CONF_DIR / "model" / arch).glob("*.yaml")):
        text = yaml_body(path)
        assert f"/model_preset@_here_: {arch}_{path.stem}" in text
        want = preset_config(arch, path.stem)
        grid = want.patch_grid()
        text_input = want.multiway if hasattr(want, "multiway") else want.text
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"model={arch}/{path.stem}", f"data.image_size={grid.image_size}",
                                              f"data.max_text_len={text_input.max_text_len}",
                                              f"tokenizer.vocab_size={text_input.vocab_size}", "tokenizer.path=x"])
        assert typed_config(resolve(cfg)).model == want, path


def yaml_body(path: Path) -> str:
    return "\n".join(line.split("#")[0] for line in path.read_text().splitlines())


def test_momentum_is_stated_once_for_the_quickstart() -> None:
    """The quickstart's ALBEF: the tiny preset has no teacher, and the experiment does not restate it."""
    assert not preset_config("albef", "tiny").momentum.enabled
    experiment = OmegaConf.load(CONF_DIR / "experiment" / "albef_tiny.yaml")
    assert "momentum" not in experiment.model
    assert preset_config("albef", "base").momentum.enabled  # ALBEF-base distils, as the paper


def test_a_config_refuses_another_arch_name() -> None:
    with pytest.raises(ValueError, match="config of arch 'clip'"):
        arch_entry("clip").config_cls(arch="albef")


@pytest.mark.parametrize("arch", arch_names())
def test_init_std_reaches_every_initialised_weight(arch):
    """`model.init_std` sets the trunc-normal std of every Linear / Conv / Embedding weight and position / [CLS]
    token of every tower (0.02 = ViT/BERT's default): with 0.1 each such tensor's std is 5x the default build's.
    (BEiT-3's masked-image head keeps PyTorch's fan-in init: it predicts a tokenizer's codes, not a tower.)"""
    def weights(init_std: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model({"arch": arch, "preset": "tiny", "init_std": init_std})
        def initialised(n: str, p: torch.Tensor) -> bool:  # matrices and tokens, not norms / biases / the MIM head
            drawn = ("weight" in n and p.dim() >= 2) or n.endswith(("pos_embed", "cls_token"))
            return drawn and p.numel() >= 64 and p.std() > 0 and not n.startswith("mim_head.")

        return {n: p.detach() for n, p in model.named_parameters() if initialised(n, p)}
    plain, wide = weights(0.02), weights(0.1)
    assert plain.keys() == wide.keys() and len(plain) >= 10
    ratios = {n: (wide[n].std() / plain[n].std()).item() for n in plain}
    assert all(4.0 < r < 6.0 for r in ratios.values()), {n: r for n, r in ratios.items() if not 4.0 < r < 6.0}
    trunc_normal_std = 0.02 * 0.8796  # a normal cut at +-2 std keeps 0.88 of its std
    assert all(abs(w.std().item() - trunc_normal_std) < 0.3 * trunc_normal_std for w in plain.values())
