"""One contract over every registered architecture and each of its valid objective subsets (timm's habit).

The cases come from the registry (`arch_names()`, each config class's `supported_objectives`), so a newly
registered architecture, or a new objective of an existing one, is covered without touching this file. Every
contract item is its own test over all cases, so a known model bug can be marked `xfail(strict=True)` for the
one (item, case) it breaks while every other item of that case keeps running.

What every PretrainModel must do, at tiny size on CPU: build on meta and CPU; `forward` on a batch of every
kind it reads returns exactly its configured objectives as finite scalar losses; backward reaches every
trainable parameter; the retrieval embeddings are unit rows that ignore right padding; `flops_per_sample`
matches a FlopCounterMode count of one training step; a state-dict checkpoint restores the embeddings
exactly; the optional capabilities work when offered and are absent (or raise ValueError) when not.
"""
from __future__ import annotations

import itertools
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmpt.data.batch import Batch, MixedBatch
from mmpt.models.config_parts import ContrastiveConfig, PatchGrid, TextInput, TowerConfig
from mmpt.models.protocol import CAPABILITIES, ModelOutput, PretrainModel, step_flops
from mmpt.models.registry import arch_entry, arch_names, build_model, preset_config

# Tiny geometry: every case builds and runs in well under a second on one CPU thread.
WIDTH, HEADS, EMBED = 32, 2, 16
IMAGE, PATCH = 32, 8  # 16 patches
TEXT_LEN, VOCAB = 16, 128
B = 4
EXTRA_PAD = 4  # padding columns appended in the padding-invariance check (all captions fit in TEXT_LEN - 4)
PAD, CLS, SEP = 0, 2, 3  # mmpt's tokenizer layout ([PAD] [UNK] [CLS] [SEP] [MASK]); 4 = [MASK]
FIRST_WORD = 5


# ---- cases: (arch, objective subset) from the registry ------------------------------------------------------

def _subsets(arch: str) -> list[tuple[str, ...]]:
    """Every non-empty subset of the arch's supported objectives, in declaration order."""
    names = arch_entry(arch).config_cls.supported_objectives
    return [combo for n in range(1, len(names) + 1) for combo in itertools.combinations(names, n)]


def _is_valid(arch: str, objectives: tuple[str, ...]) -> bool:
    """Valid = the config accepts it; configs reject a bad subset with ValueError (e.g. ALBEF without itc).
    Any other exception counts as valid, so the case is collected and fails loudly instead of vanishing."""
    try:
        preset_config(arch, "tiny", objectives=list(objectives))
    except ValueError:
        return False
    return True


CASES: list[tuple[str, tuple[str, ...]]] = [
    (arch, objs) for arch in arch_names() for objs in _subsets(arch) if _is_valid(arch, objs)
]

# (contract item, case id) -> why it fails today: real model bugs, kept visible as strict xfails (a fix
# turns the case into XPASS, which fails the run until its entry here is deleted). None open.
KNOWN_BUGS: dict[tuple[str, str], str] = {}  # (item, case id) -> reason: a strict xfail until fixed


def case_id(arch: str, objectives: tuple[str, ...]) -> str:
    return f"{arch}-{'+'.join(objectives)}"


def cases(item: str) -> list[Any]:
    """The cases for one contract item, each with a strict xfail where KNOWN_BUGS names it."""
    out = []
    for arch, objs in CASES:
        cid = case_id(arch, objs)
        reason = KNOWN_BUGS.get((item, cid))
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
        out.append(pytest.param(arch, objs, id=cid, marks=marks))
    return out


# ---- shared helpers: config, model, batches ------------------------------------------------------------------

def tiny_config(arch: str, objectives: tuple[str, ...]) -> Any:
    """Preset `tiny` shrunk through the config's own pieces (towers, text input, patch grid, ITC head), so
    no per-arch field names are needed: whatever field holds a TextInput carries the text length."""
    base = preset_config(arch, "tiny", objectives=list(objectives))
    overrides: dict[str, dict[str, Any]] = {}
    for f in fields(base):
        piece = getattr(base, f.name)
        if not is_dataclass(piece):
            continue
        o: dict[str, Any] = {}
        if isinstance(piece, TowerConfig):
            o.update(width=WIDTH, heads=HEADS)
        if isinstance(piece, TextInput):
            o.update(max_text_len=TEXT_LEN, vocab_size=VOCAB)
        if isinstance(piece, PatchGrid):
            o.update(image_size=IMAGE, patch_size=PATCH)
        if isinstance(piece, ContrastiveConfig):
            o.update(embed_dim=EMBED)
        if o:
            overrides[f.name] = o
    return preset_config(arch, "tiny", objectives=list(objectives), **overrides)


def text_len(cfg: Any) -> int:
    """max_text_len of the config's TextInput piece (`text` for dual towers, `multiway` for Multiway)."""
    (length,) = {getattr(cfg, f.name).max_text_len for f in fields(cfg) if isinstance(getattr(cfg, f.name), TextInput)}
    return int(length)


def build(cfg: Any, seed: int = 0) -> nn.Module:
    """Seeded, so two builds of one seed are the same model and builds of two seeds differ."""
    torch.manual_seed(seed)
    return build_model(cfg)


def make_part(kind: str, cfg: Any, b: int = B, seed: int = 0) -> Batch:
    """One Batch of `kind`: normalised-looking images with a random (not block-wise) patch mask (>= 1 masked
    and >= 1 visible patch per row), and right-padded `[CLS] words [SEP] [PAD]...` captions of varied length that
    all end at least EXTRA_PAD columns before max_text_len."""
    g = torch.Generator().manual_seed(seed)
    grid: PatchGrid = cfg.patch_grid()
    images = image_mask = ids = mask = None
    if kind in ("pairs", "images"):
        images = torch.randn(b, 3, grid.image_size, grid.image_size, generator=g)
        n = (grid.image_size // grid.patch_size) ** 2
        image_mask = torch.rand(b, n, generator=g) < 0.4
        image_mask[:, 0], image_mask[:, 1] = True, False
    if kind in ("pairs", "texts"):
        length = text_len(cfg)
        lengths = torch.randint(4, length - EXTRA_PAD + 1, (b,), generator=g)  # [CLS] + words + [SEP]
        positions = torch.arange(length)[None]
        mask = (positions < lengths[:, None]).long()
        ids = torch.randint(FIRST_WORD, cfg.vocab_size(), (b, length), generator=g).masked_fill(mask == 0, PAD)
        ids[:, 0] = CLS
        ids[positions == (lengths[:, None] - 1)] = SEP
    return Batch(images=images, input_ids=ids, attention_mask=mask, image_mask=image_mask,
                 image_ids=[f"{kind}{seed}-{i}" for i in range(b)])


def make_batch(model: Any, cfg: Any, seed: int = 0) -> Batch | MixedBatch:
    """A batch holding every kind the model reads: a MixedBatch when it reads more than one."""
    parts = {kind: make_part(kind, cfg, seed=seed + i) for i, kind in enumerate(model.data_kinds)}
    return MixedBatch(parts) if len(parts) > 1 else next(iter(parts.values()))


def pairs(cfg: Any, seed: int = 10) -> Batch:
    """Image-text pairs for the embedding / capability checks (every arch embeds both modalities)."""
    return make_part("pairs", cfg, seed=seed)


def total_loss(model: nn.Module, batch: Batch | MixedBatch, seed: int = 1) -> torch.Tensor:
    """What the trainer backpropagates (unit weights): every configured loss counts."""
    torch.manual_seed(seed)  # masks and negatives drawn inside forward
    return sum(model(batch).losses.values())  # type: ignore[return-value]


def _encodings(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(batch.images), model.encode_text(batch.input_ids, batch.attention_mask)


# ---- registry-level contract -------------------------------------------------------------------------------

def test_every_registered_arch_is_covered() -> None:
    """A newly registered arch is in CASES with at least its default objectives (a `tiny` preset is required)."""
    assert {arch for arch, _ in CASES} == set(arch_names())
    for arch in arch_names():
        cls = arch_entry(arch).config_cls
        assert cls.default_objectives, arch
        assert set(cls.default_objectives) <= set(cls.supported_objectives), arch
        valid = {frozenset(objs) for a, objs in CASES if a == arch}
        assert frozenset(cls.default_objectives) in valid, arch
        assert set(preset_config(arch, "tiny").objectives) == set(cls.default_objectives), arch


@pytest.mark.parametrize("arch", arch_names())
@pytest.mark.parametrize("bad", ["unknown", "defaults+unknown", "duplicate"])
def test_invalid_objectives_are_a_value_error(arch: str, bad: str) -> None:
    """An objective the arch does not support (or one named twice) is refused by the config with ValueError
    before anything is built, never silently dropped."""
    defaults = list(arch_entry(arch).config_cls.default_objectives)
    objectives = {"unknown": ["nope"], "defaults+unknown": [*defaults, "nope"], "duplicate": defaults + defaults[:1]}[bad]
    with pytest.raises(ValueError, match="objectives"):
        preset_config(arch, "tiny", objectives=objectives)


# ---- per-case contract ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "objectives"), cases("build"))
def test_builds_on_meta_and_cpu(arch: str, objectives: tuple[str, ...]) -> None:
    """Meta builds are how sizes of big presets are counted: same tensors as the CPU build, no storage."""
    cfg = tiny_config(arch, objectives)
    with torch.device("meta"):
        meta = build_model(cfg)
    cpu = build(cfg)
    assert all(t.is_meta for t in meta.state_dict().values())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in cpu.state_dict().items()}
    assert isinstance(cpu, PretrainModel)
    assert set(cpu.objectives) == set(cfg.objectives) == set(objectives)
    assert cpu.data_kinds and set(cpu.data_kinds) <= {"pairs", "images", "texts"}
    assert cpu.capabilities <= set(CAPABILITIES)


@pytest.mark.parametrize(("arch", "objectives"), cases("forward"))
def test_forward_returns_exactly_the_configured_losses(arch: str, objectives: tuple[str, ...]) -> None:
    """The trainer sums and logs exactly these keys on every rank and step."""
    cfg = tiny_config(arch, objectives)
    model = build(cfg)
    torch.manual_seed(1)
    out = model(make_batch(model, cfg))
    assert isinstance(out, ModelOutput)
    assert set(out.losses) == set(model.objectives) == set(cfg.objectives)
    for name, loss in out.losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), (name, loss)
        assert loss.requires_grad, name
    assert all(not m.requires_grad for m in out.metrics.values()), sorted(out.metrics)


@pytest.mark.parametrize(("arch", "objectives"), cases("grads"))
def test_backward_reaches_every_trainable_parameter(arch: str, objectives: tuple[str, ...]) -> None:
    """A trainable parameter that no configured loss reaches is optimizer state spent on nothing, or a head
    built but never read: what an objective set does not train must be frozen or not built."""
    cfg = tiny_config(arch, objectives)
    model = build(cfg)
    total_loss(model, make_batch(model, cfg)).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"no gradient reaches {no_grad}"
    not_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradient in {not_finite}"
    zero = [n for n, p in trainable if not p.grad.any()]
    assert not zero, f"all-zero gradient in {zero}"


@pytest.mark.parametrize(("arch", "objectives"), cases("encode"))
def test_encodings_are_unit_rows_and_ignore_right_padding(arch: str, objectives: tuple[str, ...]) -> None:
    """Retrieval ranks by dot products of these rows; a batch's padding length must not move a caption."""
    cfg = tiny_config(arch, objectives)
    model = build(cfg).eval()
    batch = pairs(cfg)
    image, text = _encodings(model, batch)
    assert image.shape == text.shape == (B, cfg.contrastive.embed_dim)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(B), atol=1e-5, rtol=0)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(B), atol=1e-5, rtol=0)
    short = slice(None, text_len(cfg) - EXTRA_PAD)
    assert (batch.attention_mask[:, short.stop:] == 0).all()  # the cut columns are padding only
    with torch.no_grad():
        unpadded = model.encode_text(batch.input_ids[:, short], batch.attention_mask[:, short])
    torch.testing.assert_close(text, unpadded, atol=1e-5, rtol=0)
    junk = torch.randint(FIRST_WORD, cfg.vocab_size(), batch.input_ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # mask 0 means "not there", whatever id the collator left in the slot
        junk_padded = model.encode_text(torch.where(batch.attention_mask.bool(), batch.input_ids, junk),
                                        batch.attention_mask)
    torch.testing.assert_close(text, junk_padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "objectives"), cases("flops"))
def test_flops_per_sample_matches_flop_counter(arch: str, objectives: tuple[str, ...]) -> None:
    """MFU is computed from flops_per_sample: it must be the FLOPs of one training step (forward + backward)."""
    cfg = tiny_config(arch, objectives)
    model = build(cfg)
    batch = make_batch(model, cfg)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # the math backend's bmm's are what the counter sees
        total_loss(model, batch).backward()
    measured, declared = counter.get_total_flops(), step_flops(model, batch)
    assert measured > 0
    assert declared == pytest.approx(measured, rel=0.1), (
        {kind: model.flops_per_sample(kind, batch_size=B) for kind in model.data_kinds}, measured / declared
    )
    unread = {"pairs", "images", "texts"} - set(model.data_kinds)
    assert all(model.flops_per_sample(kind, batch_size=B) == 0.0 for kind in unread), sorted(unread)
    with pytest.raises(ValueError, match="kind"):
        model.flops_per_sample("video")


@pytest.mark.parametrize(("arch", "objectives"), cases("state_dict"))
def test_state_dict_round_trip_restores_the_model(arch: str, objectives: tuple[str, ...], tmp_path: Path) -> None:
    """Checkpoints are plain state dicts: a fresh model of another seed loads one strictly and then embeds
    exactly as the saved model did."""
    cfg = tiny_config(arch, objectives)
    saved = build(cfg, seed=0).eval()
    path = tmp_path / "model.pt"
    torch.save(saved.state_dict(), path)
    fresh = build(cfg, seed=1).eval()
    batch = pairs(cfg)
    want = _encodings(saved, batch)
    assert not torch.equal(_encodings(fresh, batch)[0], want[0])  # the seed matters, so the load is tested
    result = fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = _encodings(fresh, batch)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(("arch", "objectives"), cases("capabilities"))
def test_capabilities_work_when_offered_and_refuse_otherwise(arch: str, objectives: tuple[str, ...]) -> None:
    """Eval calls these only when `capabilities` lists them; a model that lacks one must not return junk."""
    cfg = tiny_config(arch, objectives)
    model = build(cfg).eval()
    batch = pairs(cfg)
    calls = {
        "itm_score": lambda: model.itm_score(batch.images, batch.input_ids, batch.attention_mask),
        "generate": lambda: model.generate(batch.images, max_len=5),
        "grad_cache": lambda: model.contrastive_loss(*model.contrastive_features(batch), batch),
    }
    assert set(calls) == set(CAPABILITIES)  # a new capability needs a check here
    for name, call in calls.items():
        if name not in model.capabilities:
            if hasattr(model, name):
                with pytest.raises(ValueError):
                    call()
            continue
        with torch.no_grad():
            out = call()
        if name == "itm_score":
            assert out.shape == (B,) and out.is_floating_point()
            assert ((out >= 0) & (out <= 1)).all(), out
        elif name == "grad_cache":  # forward's losses, split into embeddings + loss (GradCache replays them)
            with torch.no_grad():
                want = model(batch).losses
            assert out.losses.keys() == want.keys() == set(objectives)
            for key in want:
                torch.testing.assert_close(out.losses[key], want[key], rtol=0, atol=1e-6, msg=key)
        else:
            assert not out.is_floating_point() and out.ndim == 2, out.dtype
            assert out.shape[0] == B and 1 <= out.shape[1] <= 5, out.shape
            assert ((out >= 0) & (out < cfg.vocab_size())).all()
