"""BEiT-3: masked data modeling per data kind, the kind -> loss-term mapping, the fused pair pass, the
retrieval path, parameter counts of the presets (meta device) and the configs that run it."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir

import mmpt.models.beit3 as beit3_module
import mmpt.models.masked_image_head as mim_head_module
from mmpt.cli.common import CONF_DIR
from mmpt.data.batch import Batch, MixedBatch
from mmpt.engine.config import ConfigError, resolve, typed_config
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.run_setup import validate
from mmpt.models.beit3 import BEiT3
from mmpt.models.beit3_config import BEiT3Config
from mmpt.models.pretrained import InitConfig, apply_init
from mmpt.models.registry import preset_config
from mmpt.modules.block import no_weight_decay_names
from mmpt.modules.heads import l2_normalize
from mmpt.objectives.mlm import IGNORE_INDEX
from mmpt.visual_tokenizer import KMeansTokenizer, fit_kmeans_tokenizer
from mmpt.visual_tokenizer.patches import CLIP_MEAN, CLIP_STD

PAD, CLS, SEP, MASK_ID = 0, 2, 3, 4
L, SIZE, PATCH = 24, 32, 8  # 16 patches
ALL = ["mdm_text", "mdm_image", "itc"]


MULTIWAY = dict(image_size=SIZE, patch_size=PATCH, width=32, layers=2, heads=2, vocab_size=100, max_text_len=L)


def tiny_config(**overrides) -> BEiT3Config:
    """Preset `tiny` (the released layout) at test size; nested overrides merge over it."""
    multiway = {**MULTIWAY, **overrides.pop("multiway", {})}
    return preset_config("beit3", "tiny", multiway=multiway, contrastive={"embed_dim": 16}, **overrides)


def tiny(**overrides) -> BEiT3:
    torch.manual_seed(0)
    return BEiT3(tiny_config(**overrides))


def part(kind: str, b: int, seed: int = 0, mask_ratio: float = 0.4) -> Batch:
    """A batch of `kind`: texts of 10..22 real tokens ([CLS] ... [SEP], then padding), random patch masks."""
    g = torch.Generator().manual_seed(seed)
    images = ids = attn = image_mask = None
    if kind != "texts":
        images = torch.randn(b, 3, SIZE, SIZE, generator=g)
        image_mask = torch.rand(b, (SIZE // PATCH) ** 2, generator=g) < mask_ratio
    if kind != "images":
        lengths = torch.randint(10, L - 1, (b, 1), generator=g)
        pos = torch.arange(L).expand(b, L)
        ids = torch.randint(5, 100, (b, L), generator=g)
        ids = torch.where(pos == 0, CLS, torch.where(pos == lengths - 1, SEP, torch.where(pos >= lengths, PAD, ids)))
        attn = (pos < lengths).long()
    return Batch(images=images, input_ids=ids, attention_mask=attn, image_mask=image_mask)


def mixed(b: int = 4, seed: int = 0, kinds=("pairs", "images", "texts")) -> MixedBatch:
    return MixedBatch({k: part(k, b, seed + i) for i, k in enumerate(kinds)})


class Spy:
    """Records the arguments of every call of `obj.name` (and still calls it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, obj, name: str) -> None:
        self.calls: list[tuple] = []
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            self.calls.append(args + tuple(kwargs.values()))
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)


# ---- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"objectives": ["mlm"]}, "objectives"),
        ({"objectives": ["itc", "itc"]}, "objectives"),
        ({"text_mask_ratio": 0.0}, "text_mask_ratio"),
        ({"pair_text_mask_ratio": 1.0}, "pair_text_mask_ratio"),
        ({"tokens": {"eos": SEP, "mask": SEP}}, "distinct"),
        ({"tokens": {"mask": SEP}}, "distinct"),  # unset eos is mmpt's [SEP] in a model built without a tokenizer
        ({"multiway": {"decoupled_attention": False}}, "sub_norm"),
        ({"visual_tokenizer": {"kind": "kmeans"}}, "visual_tokenizer.path"),
        ({"visual_tokenizer": {"patch_size": 16}}, "visual_tokenizer.patch_size"),
        ({"multiway": {"width": 30, "heads": 4}}, "divisible"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preset_config("beit3", "tiny", **overrides)


def test_empty_objectives_mean_the_default_and_itc_needs_no_tokenizer_file() -> None:
    assert BEiT3Config(objectives=[]).objectives == ["mdm_text", "mdm_image"]
    assert preset_config("beit3", "tiny", objectives=["itc"], visual_tokenizer={"kind": "kmeans"}).objectives == ["itc"]


def test_heads_exist_only_for_the_configured_objectives() -> None:
    itc_only = tiny(objectives=["itc"], visual_tokenizer={"kind": "kmeans"})  # no MIM head: no file needed
    assert itc_only.mlm_head is None and itc_only.mim_head is None
    assert itc_only.objectives == ("itc",) and itc_only.data_kinds == ("pairs",)
    mdm = tiny()
    assert mdm.objectives == ("mdm_text", "mdm_image") and mdm.data_kinds == ("pairs", "images", "texts")
    assert tiny(objectives=["mdm_image"]).data_kinds == ("pairs", "images")


# ---- masked data modeling per kind ----------------------------------------------------------------------
def test_text_masking_ratio_per_kind_on_real_tokens_only(monkeypatch) -> None:
    """texts: 15% of real non-special tokens; pairs: 50%; [CLS]/[SEP]/padding never predicted."""
    model = tiny(objectives=["mdm_text"])
    captured = Spy(monkeypatch, beit3_module, "mlm_loss")
    batch = MixedBatch({"texts": part("texts", 96, seed=1), "pairs": part("pairs", 96, seed=2)})
    model(batch)
    (_, labels), = captured.calls
    texts_labels, pair_labels = labels.reshape(2, 96, L)  # texts first, then pairs (the pooled order)
    for name, lab, ratio in (("texts", texts_labels, 0.15), ("pairs", pair_labels, 0.5)):
        ids, attn = batch.parts[name].input_ids, batch.parts[name].attention_mask
        candidate = attn.bool() & (ids != CLS) & (ids != SEP)
        selected = lab != IGNORE_INDEX
        assert not (selected & ~candidate).any()  # never special tokens or padding
        assert torch.equal(lab[selected], ids[selected])  # the label is the original token
        share = selected.sum().item() / candidate.sum().item()
        assert abs(share - ratio) < 0.05, (name, share)


def test_encoder_passes_get_masked_text_and_the_data_image_mask(monkeypatch) -> None:
    model = tiny()
    enc = model.encoder
    text_spy, image_spy, pair_spy = (Spy(monkeypatch, enc, n) for n in ("encode_text", "encode_image", "encode_pair"))
    batch = mixed(8)
    model(batch)
    assert len(text_spy.calls) == len(image_spy.calls) == len(pair_spy.calls) == 1  # one pass per kind
    ids_t, _ = text_spy.calls[0]
    images_i, mask_i = image_spy.calls[0]
    images_p, ids_p, _, mask_p = pair_spy.calls[0]
    assert torch.equal(images_i, batch.parts["images"].images) and torch.equal(mask_i, batch.parts["images"].image_mask)
    assert torch.equal(images_p, batch.parts["pairs"].images) and torch.equal(mask_p, batch.parts["pairs"].image_mask)
    for ids, name in ((ids_t, "texts"), (ids_p, "pairs")):
        original = batch.parts[name].input_ids
        assert (ids == MASK_ID).any() and not torch.equal(ids, original)  # the model saw masked text
        assert not ((ids != original) & ~batch.parts[name].attention_mask.bool()).any()  # padding untouched


def test_image_term_scores_masked_patches_only(monkeypatch) -> None:
    """mdm_image = mean over masked patches (images and pairs pooled) of the per-patch MSE to the pixel
    targets of the UNMASKED image, recomputed here from the hidden states the head was given."""
    model = tiny(objectives=["mdm_image"])
    head = model.mim_head
    spy = Spy(monkeypatch, head, "forward")
    batch = MixedBatch({"pairs": part("pairs", 3, 1), "images": part("images", 5, 2)})
    out = model(batch)
    (hidden, images, mask), = spy.calls
    assert hidden.shape == (8, 16, 32) and torch.equal(mask, torch.cat([batch.parts["images"].image_mask,
                                                                        batch.parts["pairs"].image_mask]))
    target = head.tokenizer.encode(images)  # `b n (p p c)` from the unmasked images
    per_patch = (head.head(hidden) - target).pow(2).mean(-1)
    expected = per_patch[mask].mean()
    assert out.losses["mdm_image"].item() == pytest.approx(expected.item(), rel=1e-5)
    grad = torch.autograd.grad(out.losses["mdm_image"], hidden)[0]  # no gradient from unmasked patches
    assert grad[~mask].abs().sum() == 0 and grad[mask].abs().sum() > 0


@pytest.mark.parametrize(
    ("objectives", "kinds", "terms"),
    [
        (ALL, ("texts",), {"mdm_text"}),
        (ALL, ("images",), {"mdm_image"}),
        (ALL, ("pairs",), {"mdm_text", "mdm_image", "itc"}),
        (ALL, ("pairs", "images", "texts"), {"mdm_text", "mdm_image", "itc"}),
        (["mdm_text", "mdm_image"], ("pairs", "images", "texts"), {"mdm_text", "mdm_image"}),
        (["mdm_text", "mdm_image"], ("images", "texts"), {"mdm_text", "mdm_image"}),
        (["mdm_image"], ("pairs",), {"mdm_image"}),
        (["itc"], ("pairs",), {"itc"}),
    ],
)
def test_kind_to_terms(objectives, kinds, terms) -> None:
    out = tiny(objectives=objectives)(mixed(4, kinds=kinds))
    assert set(out.losses) == terms
    assert all(loss.requires_grad and torch.isfinite(loss) for loss in out.losses.values())
    assert ("mdm_text_acc" in out.metrics) == ("mdm_text" in terms)


def test_plain_pair_batch_is_accepted() -> None:
    assert set(tiny(objectives=ALL)(part("pairs", 4)).losses) == set(ALL)


@pytest.mark.parametrize(
    ("objectives", "batch", "match"),
    [
        (["itc"], mixed(2, kinds=("pairs", "texts")), r"no use for \['texts'\]"),
        (["mdm_text"], mixed(2, kinds=("images",)), r"no use for \['images'\]"),
        (ALL, MixedBatch({"images": replace(part("images", 2), image_mask=None)}), "data.image_mask.enabled"),
        (ALL, replace(part("pairs", 2), image_mask=None), "data.image_mask.enabled"),
    ],
)
def test_unusable_batches_are_clear_errors(objectives, batch, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(objectives=objectives)(batch)


def test_text_only_objective_needs_no_image_mask() -> None:
    out = tiny(objectives=["mdm_text"])(replace(part("pairs", 2), image_mask=None))
    assert set(out.losses) == {"mdm_text"}


def test_pair_pass_predicts_both_modalities_from_both() -> None:
    """One fused pass: the masked text depends on the image and the masked patches on the text."""
    model = tiny(objectives=["mdm_text", "mdm_image"])
    pairs = part("pairs", 4, seed=3)

    def losses(batch: Batch) -> dict[str, float]:
        torch.manual_seed(7)  # the same text mask every time
        return {k: v.item() for k, v in model(batch).losses.items()}

    base = losses(pairs)
    assert set(base) == {"mdm_text", "mdm_image"}
    other_images = part("pairs", 4, seed=4).images
    # keep the pixel targets at the masked patches: change only visible patches (their own targets are unscored)
    visible = ~pairs.image_mask.reshape(4, 1, 4, 1, 4, 1).expand(4, 3, 4, PATCH, 4, PATCH).reshape(4, 3, SIZE, SIZE)
    new_images = torch.where(visible, other_images, pairs.images)
    changed_image = losses(replace(pairs, images=new_images))
    assert changed_image["mdm_text"] != pytest.approx(base["mdm_text"], rel=1e-4)
    ids = pairs.input_ids
    real = pairs.attention_mask.bool() & (ids != CLS) & (ids != SEP)
    changed_text = losses(replace(pairs, input_ids=torch.where(real, (ids - 5 + 1) % 95 + 5, ids)))
    assert changed_text["mdm_image"] != pytest.approx(base["mdm_image"], rel=1e-4)


@pytest.mark.slow  # a learning test: 40 AdamW steps, 3-5 s on one CPU core
def test_loss_falls_on_a_fixed_mixed_batch_with_discrete_targets(tmp_path) -> None:
    """k-means visual tokens (16 codes, a real tokenizer file) + MLM; 40 AdamW steps on one mixed batch."""
    torch.manual_seed(0)
    # smooth images (8x8 colour blocks of 4 px), so every patch has structure the codebook can name
    smooth = lambda x: torch.nn.functional.interpolate(x[:, :, ::4, ::4], scale_factor=4)  # noqa: E731
    batch = MixedBatch({k: replace(p, images=smooth(p.images)) if p.images is not None else p
                        for k, p in mixed(8, seed=5).parts.items()})
    images = torch.cat([batch.parts["pairs"].images, batch.parts["images"].images])
    tok, _ = fit_kmeans_tokenizer(images, 16, PATCH, CLIP_MEAN, CLIP_STD, iters=10)
    tok.save(tmp_path / "kmeans16.safetensors")
    model = tiny(visual_tokenizer={"kind": "kmeans", "path": str(tmp_path / "kmeans16.safetensors")})
    assert model.mim_head.head.out_features == 16
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(40):
        torch.manual_seed(1)  # fixed text masks: a fixed problem the model can fit
        out = model(batch)
        loss = out.losses["mdm_text"] + out.losses["mdm_image"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in out.losses.items()} | {"acc": out.metrics["mdm_image_acc"].item()})
    first, last = history[0], history[-1]
    assert last["mdm_text"] < 0.5 * first["mdm_text"], (first, last)
    assert last["mdm_image"] < 0.5 * first["mdm_image"], (first, last)
    assert last["acc"] > first["acc"]


# ---- retrieval path ------------------------------------------------------------------------------------
def test_retrieval_embeddings_are_normalised_cls_projections() -> None:
    model = tiny(objectives=ALL).eval()
    pairs = part("pairs", 5, seed=6)
    img, txt = model.encode_image(pairs.images), model.encode_text(pairs.input_ids, pairs.attention_mask)
    assert img.shape == txt.shape == (5, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(5), atol=1e-5)
    cls_img = model.encoder.encode_image(pairs.images)[:, 0]
    assert torch.allclose(img, l2_normalize(cls_img @ model.vision_proj.proj.weight.T), atol=1e-6)
    # text [CLS] ignores padding: rewrite every padded id, the embedding stays
    noisy = torch.where(pairs.attention_mask.bool(), pairs.input_ids, 77)
    assert torch.allclose(txt, model.encode_text(noisy, pairs.attention_mask), atol=1e-5)
    out = model(pairs)
    ref, _ = model.itc(img, txt)
    assert out.losses["itc"].item() == pytest.approx(ref.item(), rel=1e-5)  # ITC uses the unmasked passes


def test_itc_stage_starts_from_an_mdm_checkpoint(tmp_path) -> None:
    """model.init.checkpoint from an MDM model: backbone copied, MDM head tensors skipped without error."""
    mdm = tiny()
    path = tmp_path / "mdm.pt"
    torch.save(mdm.state_dict(), path)
    itc = tiny(objectives=["itc"])
    torch.manual_seed(123)
    itc.encoder.apply(lambda m: [torch.nn.init.normal_(p) for p in m.parameters(recurse=False)])
    (report,) = apply_init(itc, InitConfig(checkpoint=str(path)))
    source = mdm.encoder.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in itc.encoder.state_dict().items())
    assert report.unexpected and all(k.startswith(("mlm_head.", "mim_head.")) for k in report.unexpected)


# ---- accounting --------------------------------------------------------------------------------------------
def _meta_counts(cfg: BEiT3Config, monkeypatch, codes: int | None = None) -> dict[str, int]:
    if codes is not None:  # a BEiT v2-sized codebook without a 25 MB file: a k-means tokenizer on meta
        def fake(tok_cfg):
            dim = tok_cfg.patch_size**2 * 3
            return KMeansTokenizer(torch.empty(codes, dim), tok_cfg.patch_size, tok_cfg.image_size, CLIP_MEAN,
                                   CLIP_STD, 0.01)
        monkeypatch.setattr(mim_head_module, "build_visual_tokenizer", fake)
    with torch.device("meta"):
        model = BEiT3(cfg)
    counts = model.param_counts()
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    return counts


def _backbone(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k.startswith("backbone/"))


def test_base_counts_match_the_released_model(monkeypatch) -> None:
    """REFERENCE: backbone 221.0M; 276M with the MLM head 768 x 64010 and the MIM head 768 x 8192."""
    counts = _meta_counts(preset_config("beit3", "base", objectives=ALL), monkeypatch, codes=8192)
    assert _backbone(counts) == pytest.approx(221.0e6, rel=0.005)
    assert counts["mlm_head"] == 768 * 64010 and counts["mim_head"] == 768 * 8192 + 8192
    assert _backbone(counts) + counts["mlm_head"] + counts["mim_head"] == pytest.approx(276e6, rel=0.005)
    assert counts["itc_heads"] == 2 * 768 * 768 + 1 and counts["visual_tokenizer"] == 0  # codebook: a buffer


def test_large_backbone(monkeypatch) -> None:
    assert _backbone(_meta_counts(preset_config("beit3", "large"), monkeypatch)) == pytest.approx(672.7e6, rel=0.005)


def test_giant_parts_match_the_paper(monkeypatch) -> None:
    counts = _meta_counts(preset_config("beit3", "giant"), monkeypatch)
    for part, paper in (("attention", 317e6), ("ffn_v", 692e6), ("ffn_l", 692e6), ("ffn_vl", 52e6)):
        assert counts[f"backbone/{part}"] == pytest.approx(paper, rel=0.01), part
    assert _backbone(counts) == pytest.approx(1.9e9, rel=0.03)
    assert counts["mlm_head"] == 1408 * 64010


def test_flops_per_sample_by_kind() -> None:
    model = tiny(objectives=ALL)
    enc, n = model.encoder, model.encoder.num_patches
    mlm, mim = 6.0 * 100 * 32 * L, 6.0 * 32 * (PATCH * PATCH * 3) * n
    assert model.flops_per_sample("texts") == enc.flops(False, L) + mlm
    assert model.flops_per_sample("images") == enc.flops(True) + mim
    itc = enc.flops(True) + enc.flops(False, L) + 2 * 6.0 * 32 * 16
    assert model.flops_per_sample("pairs") == pytest.approx(enc.flops(True, L) + mlm + mim + itc)
    assert tiny(objectives=["itc"]).flops_per_sample("texts") == 0.0
    with pytest.raises(ValueError, match="kind"):
        model.flops_per_sample("video")


def test_no_weight_decay_names() -> None:
    names = no_weight_decay_names(tiny(objectives=ALL))
    assert {"encoder.patch_embed.mask_token", "encoder.patch_embed.cls_token", "itc.logit_scale",
            "encoder.text_embed.pos_embed"} <= names
    assert "mlm_head.decoder.weight" not in names and "vision_proj.proj.weight" not in names


# ---- configs ---------------------------------------------------------------------------------------------
def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("preset", ["base", "large", "giant"])
def test_yaml_presets_equal_the_python_presets(preset) -> None:
    cfg = composed([f"model=beit3/{preset}", "data.image_size=224", "tokenizer.vocab_size=64010",
                    "data.max_text_len=1024"])
    model = typed_config(resolve(cfg)).model
    want = preset_config("beit3", preset)
    assert model.multiway == want.multiway and model.contrastive.embed_dim == want.contrastive.embed_dim


SINGLE = DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")
def test_tiny_mdm_experiment_validates(demo_env) -> None:
    prep = validate(composed(["experiment=beit3_tiny_mdm"]), SINGLE)
    m = prep.cfg.model
    mw = m.multiway
    assert (mw.width, mw.layers, mw.image_size, mw.patch_size, mw.max_text_len) == (64, 2, 64, 8, 24)
    assert mw.vocab_size == prep.cfg.tokenizer.vocab_size and m.objectives == ["mdm_text", "mdm_image"]
    assert {s.kind for s in prep.cfg.data.sources} == {"pairs", "images", "texts"} and prep.cfg.data.image_mask.enabled
    assert prep.cfg.data.image_mask.patch_size == 8
    assert prep.cfg.loss.weights == {"mdm_text": 1.0, "mdm_image": 1.0}  # itc is not an objective of this stage


def test_tiny_itc_stage_and_experiment_errors(demo_env) -> None:
    with pytest.raises(ConfigError, match="no_such_run"):  # the stage needs its MDM run
        validate(composed(["experiment=beit3_tiny_itc", "model.init.checkpoint=no_such_run"]), SINGLE)
    itc = validate(composed(["experiment=beit3_tiny_itc", "model.init.checkpoint=null"]), SINGLE)
    assert itc.cfg.model.objectives == ["itc"] and not itc.cfg.data.sources
    # the patch size set explicitly (see _MIXED_DEMO_PATCH) so that these reach the checks they are about
    mdm = ["experiment=beit3_tiny_mdm", "data.image_mask.patch_size=8"]
    with pytest.raises(ConfigError, match=r"feeds it \['images', 'texts'\]"):  # ITC-only reads pairs only
        validate(composed([*mdm, "model.objectives=[itc]"]), SINGLE)
    # no ITC term in MDM: a weight for it is a mistake
    with pytest.raises(ConfigError, match=r"loss.weights has \['itc'\] but model.objectives"):
        validate(composed([*mdm, "+loss.weights.itc=0"]), SINGLE)


def test_base_mdm_experiment_composes() -> None:
    cfg = composed(["experiment=beit3_base_mdm", "tokenizer.path=tok.json", "data.sources.0.urls='p/{0..9}.tar'",
                    "data.sources.1.urls='i/{0..9}.tar'", "data.sources.2.urls='t/{0..9}.tar'",
                    "model.visual_tokenizer.path=vqkd.pt"])
    typed = typed_config(resolve(cfg))
    assert [s.kind for s in typed.data.sources] == ["pairs", "images", "texts"] and typed.data.batch_size == 96
    assert typed.trainer.global_batch_size == 6144 and typed.data.image_mask.num_masked == 75
    assert typed.model.visual_tokenizer.kind == "frozen" and typed.model.multiway.width == 768


def test_masked_image_objective_without_patch_masks_is_a_launch_problem() -> None:
    """Refused at launch with the fix, instead of a ValueError at the first step."""
    from mmpt.models.config_parts import Launch

    def problems(objectives: list[str], mask_patch: int | None, training: bool = True) -> list[str]:
        cfg = preset_config("beit3", "tiny", objectives=objectives)
        return cfg.launch_problems(Launch(world_size=1, micro_batch=4, zero_stage=0, image_size=64,
                                          image_mask_patch=mask_patch, training=training))

    (no_masks,) = problems(["mdm_text", "mdm_image"], None)
    assert "mdm_image" in no_masks and "data.image_mask.enabled=true" in no_masks
    assert problems(["mdm_text", "mdm_image"], 8) == []
    assert problems(["mdm_text", "itc"], None) == []
    assert problems(["mdm_text", "mdm_image"], None, training=False) == []  # evaluating or loading needs no masks
