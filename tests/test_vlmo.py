"""VLMo: expert routing of every pass, kind -> loss terms (MixedBatch), one MLM term over pairs + texts, ITM
negatives, the shared `hard_negative_rows`, heads and data kinds per `model.objectives`, stagewise freezing
and chaining from the real experiment configs, falling losses, FLOPs per kind, presets (Hydra + meta-device
sizes) and config errors."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmpt.cli.common import CONF_DIR
from mmpt.data.batch import Batch, MixedBatch
from mmpt.engine.config import ConfigError, check_data, resolve, typed_config
from mmpt.engine.optim import build_optimizer
from mmpt.engine.run_setup import check_model_setup
from mmpt.engine.trainer import micro_step
from mmpt.models import vlmo as vlmo_module
from mmpt.models.freezing import apply_freeze
from mmpt.models.pretrained import InitConfig, apply_init
from mmpt.models.multiway_presets import param_counts_by_part
from mmpt.models.protocol import PretrainModel
from mmpt.models.registry import build_model, preset_config
from mmpt.models.vlmo import VLMo, VLMoConfig
from mmpt.modules.block import no_weight_decay_names
from mmpt.modules.multiway import Expert
from mmpt.objectives.itm import hard_negative_rows
from mmpt.objectives.pair_codes import text_codes
from mmpt.objectives.mlm import IGNORE_INDEX
from mmpt.visual_tokenizer import VisualTokenizerConfig

B, L, VOCAB, IMG, PATCH = 6, 12, 60, 32, 8
N = (IMG // PATCH) ** 2  # 16 patches


@pytest.fixture(autouse=True)
def one_thread():
    """Many small ops: intra-op threads only add contention on a small shared CPU (measured 4x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ALL = ["itc", "itm", "mlm", "mim"]
MULTIWAY = dict(image_size=IMG, patch_size=PATCH, width=32, heads=2, layers=2, vl_layers=1, vocab_size=VOCAB,
                max_text_len=L)


def config(mim: bool = True, multiway: dict | None = None, **overrides: object) -> VLMoConfig:
    """Preset `tiny` at test size; mim=True adds masked image modeling (pixel targets) to the default
    objectives [itc, itm, mlm]. `multiway` / other nested overrides merge over the preset. The ITC temperature
    (0.07) and ITM negatives (hard from step 0) are VLMo's own, which these tests were written against (the
    tiny preset starts at 0.03 with an ITM curriculum)."""
    kw: dict = dict(multiway={**MULTIWAY, **(multiway or {})}, contrastive={"embed_dim": 32, "temperature_init": 0.07},
                    objectives=ALL if mim else [], visual_tokenizer={"kind": "pixels"},
                    itm={"hardness_warmup_steps": 0})
    kw.update(overrides)
    return preset_config("vlmo", "tiny", **kw)


def build(mim: bool = True, seed: int = 0, **overrides: object) -> VLMo:
    torch.manual_seed(seed)
    return VLMo(config(mim, **overrides))


def text(b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `b l` ids with [CLS] ... [SEP], every row a distinct caption."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, L), generator=g)
    lengths = torch.randint(5, L + 1, (b,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    ids[:, 0] = 2
    ids[torch.arange(b), lengths - 1] = 3
    return ids, mask


def pairs(b: int = B, seed: int = 0, image_ids: list[str] | None = None) -> Batch:
    ids, mask = text(b, seed)
    images = torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed + 1))
    return Batch(images=images, input_ids=ids, attention_mask=mask, image_ids=image_ids or [])


def images(b: int = 4, seed: int = 10) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, N, generator=g) < 0.4
    mask[:, 0] = True  # every image has a masked patch
    return Batch(images=torch.randn(b, 3, IMG, IMG, generator=g), image_mask=mask)


def texts(b: int = 4, seed: int = 20) -> Batch:
    ids, mask = text(b, seed)
    return Batch(input_ids=ids, attention_mask=mask)


def mixed(kinds: tuple[str, ...]) -> MixedBatch:
    make = {"pairs": pairs, "images": images, "texts": texts}
    return MixedBatch({k: make[k]() for k in kinds})


def grads_by_expert(model: VLMo) -> dict[str, bool]:
    """Whether any parameter of each expert kind / embedding / head received a gradient."""
    seen: dict[str, bool] = defaultdict(bool)
    for name, p in model.named_parameters():
        key = next((e for e in ("ffn_vl", "ffn_v", "ffn_l") if f".{e}." in name), None) or name.split(".")[0]
        if name.startswith("encoder.") and key == "encoder":
            key = name.split(".")[1]
        seen[key] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
    return dict(seen)


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return typed_config(resolve(compose("train", overrides=[f"experiment={name}", *overrides])))


# ---- protocol, presets, config ----------------------------------------------------------------------------

def test_protocol_registry_and_objectives() -> None:
    model = build_model({"arch": "vlmo", "multiway": {"image_size": IMG, "vocab_size": VOCAB, "max_text_len": L}})
    assert isinstance(model, VLMo) and isinstance(model, PretrainModel)
    assert model.objectives == ("itc", "itm", "mlm")  # the default: MIM only when listed
    assert model.mim_head is None and model.data_kinds == ("pairs", "texts")  # no MIM: no image-only data
    assert model.capabilities == {"itm_score"}
    assert set(model.default_loss_weights) == set(VLMoConfig.supported_objectives) == set(ALL)
    full = build()
    assert full.objectives == tuple(ALL) and full.data_kinds == ("pairs", "images", "texts")
    assert full.mim_head is not None and full.config.visual_tokenizer.kind == "pixels"
    assert {"encoder.patch_embed.pos_embed", "encoder.patch_embed.mask_token", "itc.logit_scale"} <= (
        no_weight_decay_names(model))
    assert "encoder.transformer.blocks.0.gamma_ffn" in no_weight_decay_names(build(multiway={"layer_scale": 0.1}))


def test_itc_only_builds_no_fusion_heads_and_returns_only_itc() -> None:
    model = build(mim=False, objectives=["itc"])
    assert model.objectives == ("itc",) and model.data_kinds == ("pairs",)
    assert model.itm_head is None and model.mlm_head is None and model.mim_head is None
    assert not any(n.startswith(("itm_head.", "mlm_head.", "mim_head.")) for n in model.state_dict())
    assert model.capabilities == {"grad_cache"}  # contrastive only: GradCache can split its loss
    batch = pairs()
    with pytest.raises(ValueError, match="add itm to model.objectives"):
        model.itm_score(batch.images, batch.input_ids, batch.attention_mask)
    out = model(batch)
    assert set(out.losses) == {"itc"} and out.losses["itc"].requires_grad and torch.isfinite(out.losses["itc"])
    # dual encoder only: the image-only and the text-only pass, no fused call; the loss is ITC of the retrieval
    # embeddings, whose heads this objective trains
    n = 1 + N
    assert expert_calls(model, lambda: model(batch)) == {(0, "ffn_v"): B * n, (1, "ffn_v"): B * n,
                                                         (0, "ffn_l"): B * L, (1, "ffn_l"): B * L}
    with torch.no_grad():
        ref, _ = model.itc(model.encode_image(batch.images), model.encode_text(batch.input_ids, batch.attention_mask))
    assert out.losses["itc"].item() == pytest.approx(ref.item(), rel=1e-6)
    retrieval = [p for name, p in model.named_parameters() if name.startswith(("image_proj.", "text_proj.", "itc."))]
    assert retrieval and all(p.requires_grad for p in retrieval)
    with pytest.raises(ValueError, match=r"no use for \['texts'\]"):
        model(mixed(("pairs", "texts")))


def test_mim_only_reads_image_data_only() -> None:
    model = build(objectives=["mim"])
    assert model.objectives == ("mim",) and model.data_kinds == ("images",)
    assert model.mim_head is not None and model.itm_head is None and model.mlm_head is None
    assert model.capabilities == frozenset()
    # the retrieval projections stay (eval embeds through them) but no objective trains them: frozen
    retrieval = [p for name, p in model.named_parameters() if name.startswith(("image_proj.", "text_proj.", "itc."))]
    assert retrieval and not any(p.requires_grad for p in retrieval)
    assert set(model(images()).losses) == {"mim"}
    for kinds in (("pairs",), ("texts",), ("images", "texts")):
        with pytest.raises(ValueError, match="no use for"):
            model(mixed(kinds))


def test_preset_sizes_on_meta() -> None:
    for preset, paper, w in (("base", 175e6, 768), ("large", 562e6, 1024)):
        with torch.device("meta"):
            model = VLMo(preset_config("vlmo", preset))
        backbone = sum(p.numel() for p in model.encoder.parameters())
        assert abs(backbone / paper - 1) < 0.01, backbone
        # heads: two w x w ITC projections, MLM transform (w x w + bias) + LayerNorm + vocab bias (decoder tied
        # to the word embeddings), ITM w x 2 + 2, the logit scale
        heads = 2 * w * w + (w * w + w) + 2 * w + 30522 + (2 * w + 2) + 1
        assert sum(p.numel() for p in model.parameters()) == backbone + heads
        parts = param_counts_by_part(model.encoder)
        vl = 2 if w == 768 else 3
        assert parts["ffn_vl"] == vl * (2 * w * 4 * w + 4 * w + w + 2 * w)  # fc1, fc2 (+ biases), its LayerNorm
        assert parts["ffn_v"] == parts["ffn_l"] == parts["ffn_vl"] * model.config.multiway.layers // vl


def test_hydra_presets_and_stage_configs_compose(demo_env: dict[str, str]) -> None:
    tiny = compose_experiment("vlmo_tiny_pairs")
    mw = tiny.model.multiway
    assert (mw.width, mw.layers, mw.vl_layers, mw.patch_size) == (64, 2, 1, 8)
    assert tiny.data.image_size == mw.image_size == 64 and mw.max_text_len == 24
    assert mw.vocab_size == tiny.tokenizer.vocab_size
    assert tiny.model.objectives == ["itc", "itm", "mlm"] and tiny.model.itm.hardness_warmup_steps == 1000
    s1 = compose_experiment("vlmo_tiny_stage1_image")
    assert s1.model.objectives == ["mim"] and s1.model.visual_tokenizer.kind == "kmeans"
    assert [s.kind for s in s1.data.sources] == ["images"]
    assert s1.data.image_mask.enabled and s1.data.image_mask.patch_size == 8
    assert compose_experiment("vlmo_tiny_stage2_text", "model.init.checkpoint=/prev").model.objectives == ["mlm"]
    s3 = compose_experiment("vlmo_tiny_stage3_pairs", "model.init.checkpoint=/prev")
    assert s3.model.init.checkpoint == "/prev" and not s3.model.train and not s3.model.freeze
    paper = compose_experiment("vlmo_stage3_pairs", "data.train.urls=/x.tar", "model.init.checkpoint=/prev")
    assert (paper.model.multiway.width, paper.model.multiway.layers, paper.trainer.global_batch_size,
            paper.optimizer.lr) == (768, 12, 1024, 2e-4)
    with pytest.raises(ConfigError, match="visual_tokenizer.path"):
        compose_experiment("vlmo_stage1_image", "data.sources.0.urls=/x.tar")
    paper_stages = {"vlmo_stage1_image": ["data.sources.0.urls=/i.tar", "model.visual_tokenizer.path=/tok"],
                    "vlmo_stage2_text": ["data.sources.0.urls=/t.txt", "model.init.checkpoint=/p"]}
    for name, extra in paper_stages.items():
        staged = compose_experiment(name, *extra)
        staged.model.visual_tokenizer = VisualTokenizerConfig(kind="pixels")  # no tokenizer file here
        staged.model.__post_init__()
        with torch.device("meta"):
            counts = apply_freeze(build_model(staged.model), staged.model.train, staged.model.freeze)
        assert 0 < counts.trainable < counts.total  # every pattern matched a base-model parameter
    # pre-launch: image-only data for a VLMo without a MIM head is refused with the kinds it can use
    with torch.device("meta"):
        probe = build_model(tiny.model)
    tiny.data.sources = s1.data.sources
    with pytest.raises(ConfigError, match=r"trains on \['pairs', 'texts'\].*\['images'\]"):
        check_data(tiny, tuple(probe.data_kinds))


@pytest.mark.parametrize("name", ["vlmo_tiny_stage2_text", "vlmo_tiny_stage3_pairs"])
def test_later_stage_without_its_checkpoint_is_refused(demo_env: dict[str, str], name: str) -> None:
    """A later stage says model.init.checkpoint_required: starting it from random weights is refused."""
    cfg = compose_experiment(name)
    assert cfg.model.init.checkpoint_required and cfg.model.init.checkpoint is None
    with pytest.raises(ConfigError, match="model.init.checkpoint is required"):
        check_model_setup(cfg, build_model(cfg.model))


@pytest.mark.parametrize("overrides, match", [
    ({"multiway": {"vl_layers": 0}}, "vl_layers"),
    ({"multiway": {"width": 33}}, "divisible by multiway.heads"),
    ({"multiway": {"image_size": 30}}, "multiple of multiway.patch_size"),
    ({"tokens": {"bos": 2, "mask": 2}}, "distinct"),
    ({"tokens": {"mask": 2}}, "distinct"),  # unset bos is mmpt's [CLS] = 2 in a model built without a tokenizer
    ({"mlm": {"mask_prob": 0.0}}, "mlm.mask_prob"),
    ({"objectives": ["itc", "mdm_text"]}, "objectives"),
])
def test_config_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(**overrides)
    with pytest.raises(ValueError, match="needs visual_tokenizer.path"):
        VLMoConfig(objectives=["mim"], visual_tokenizer={"kind": "kmeans"})  # type: ignore[arg-type]
    VLMoConfig(visual_tokenizer={"kind": "kmeans"})  # type: ignore[arg-type]  # no mim: no MIM head, no file needed
    with pytest.raises(ValueError, match="visual_tokenizer.patch_size=16 differs"):
        VLMoConfig(objectives=ALL, visual_tokenizer={"kind": "pixels", "patch_size": 16})  # type: ignore[arg-type]


def test_bad_batches_get_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no use for \['images'\].*add the objective"):
        build(mim=False)(images())
    unmasked = Batch(images=images().images)
    with pytest.raises(ValueError, match="data.image_mask.enabled=true"):
        build()(unmasked)


# ---- routing ----------------------------------------------------------------------------------------------

def expert_calls(model: VLMo, fn) -> dict[tuple[int, str], int]:
    """(block, expert) -> tokens it processed while running fn()."""
    calls: dict[tuple[int, str], int] = defaultdict(int)
    hooks = []
    for i, block in enumerate(model.encoder.transformer.blocks):
        for name in ("ffn_v", "ffn_l", "ffn_vl"):
            expert = getattr(block, name)
            if isinstance(expert, Expert):
                def hook(_m, args, _out, key=(i, name)):
                    calls[key] += args[0].shape[0] * args[0].shape[1]
                hooks.append(expert.register_forward_hook(hook))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return dict(calls)


def test_each_pass_runs_the_experts_it_should() -> None:
    model = build().eval()
    b, n = 3, 1 + N
    batch = pairs(b)
    img = expert_calls(model, lambda: model.encode_image(batch.images))
    assert img == {(0, "ffn_v"): b * n, (1, "ffn_v"): b * n}  # V-FFN all the way up, VL-FFN block included
    txt = expert_calls(model, lambda: model.encode_text(batch.input_ids, batch.attention_mask))
    assert txt == {(0, "ffn_l"): b * L, (1, "ffn_l"): b * L}
    fused = expert_calls(model, lambda: model.itm_score(batch.images, batch.input_ids, batch.attention_mask))
    assert fused == {(0, "ffn_v"): b * n, (0, "ffn_l"): b * L, (1, "ffn_vl"): b * (n + L)}
    # training forward on pairs: image pass + text pass + ONE fused call over (4 b) rows
    train = expert_calls(model, lambda: model(batch))
    assert train == {(0, "ffn_v"): b * n + 4 * b * n, (1, "ffn_v"): b * n, (0, "ffn_l"): b * L + 4 * b * L,
                     (1, "ffn_l"): b * L, (1, "ffn_vl"): 4 * b * (n + L)}
    assert expert_calls(model, lambda: model(images())) == {(0, "ffn_v"): 4 * n, (1, "ffn_v"): 4 * n}
    assert expert_calls(model, lambda: model(texts())) == {(0, "ffn_l"): 4 * L, (1, "ffn_l"): 4 * L}


@pytest.mark.parametrize("kinds, terms, trained, untouched", [
    (("images",), {"mim"}, {"ffn_v", "patch_embed", "mim_head"},
     {"ffn_l", "ffn_vl", "text_embed", "mlm_head", "image_proj", "text_proj", "itm_head", "itc"}),
    (("texts",), {"mlm"}, {"ffn_l", "text_embed", "mlm_head"},
     {"ffn_v", "ffn_vl", "patch_embed", "mim_head", "image_proj", "text_proj", "itm_head", "itc"}),
    (("pairs",), {"itc", "itm", "mlm"},
     {"ffn_v", "ffn_l", "ffn_vl", "patch_embed", "text_embed", "mlm_head", "image_proj", "text_proj", "itm_head", "itc"},
     {"mim_head"}),
    (("pairs", "images", "texts"), {"itc", "itm", "mlm", "mim"},
     {"ffn_v", "ffn_l", "ffn_vl", "mlm_head", "mim_head", "itm_head", "itc"}, set()),
])
def test_kind_decides_terms_and_gradients(kinds, terms, trained, untouched) -> None:
    model = build()
    weights = {"itc": 1.0, "itm": 2.0, "mlm": 0.5, "mim": 3.0}

    class Engine:  # what the trainer's micro_step calls on DeepSpeed's engine
        def __call__(self, batch):
            return model(batch)

        def backward(self, loss):
            loss.backward()

        def step(self):
            pass

    out, total = micro_step(Engine(), mixed(kinds), weights)
    assert set(out.losses) == terms and all(torch.isfinite(v) for v in out.losses.values())
    assert total.item() == pytest.approx(sum(weights[k] * v.item() for k, v in out.losses.items()), rel=1e-6)
    seen = grads_by_expert(model)
    assert all(seen[k] for k in trained), seen
    assert not any(seen[k] for k in untouched), seen


def test_one_mlm_term_over_pairs_and_texts_and_the_fused_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With fixed masking, `mlm` = CE summed over the masked tokens of both parts / their count, where the
    pairs' logits come from the fused pass of (image, masked text) -- the MLM rows of the (4 b) call."""
    model = build(mim=False).double().eval()

    def fixed_mask(ids, mask, *args, **kwargs):
        chosen = (torch.arange(ids.shape[1]) % 3 == 1)[None] & mask.bool() & (ids > 4)
        return torch.where(chosen, torch.full_like(ids, 4), ids), torch.where(chosen, ids, IGNORE_INDEX)

    monkeypatch.setattr(vlmo_module, "mask_tokens", fixed_mask)
    p, t = pairs(), texts()
    p.images = p.images.double()
    out = model(MixedBatch({"pairs": p, "texts": t}))
    enc, split = model.encoder, model.encoder.num_image_tokens
    rows = []
    with torch.no_grad():
        masked_p, labels_p = fixed_mask(p.input_ids, p.attention_mask)
        rows.append((model.mlm_head(enc.encode_pair(p.images, masked_p, p.attention_mask)[:, split:]), labels_p))
        masked_t, labels_t = fixed_mask(t.input_ids, t.attention_mask)
        rows.append((model.mlm_head(enc.encode_text(masked_t, t.attention_mask)), labels_t))
    ce = sum(F.cross_entropy(x.reshape(-1, VOCAB), y.reshape(-1), reduction="sum") for x, y in rows)
    count = sum(int((y != IGNORE_INDEX).sum()) for _, y in rows)
    assert count > 10
    assert out.losses["mlm"].item() == pytest.approx(ce.item() / count, rel=1e-9)


# ---- ITM negatives ------------------------------------------------------------------------------------------

def test_itm_negatives_obey_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across many draws: never the positive, never a pair with the same image id, never an identical caption;
    every negative is a real row of the batch (raw images / ids / masks picked consistently)."""
    model = build(mim=False)
    image_ids = ["a", "b", "a", "c", "d", "e"]  # rows 0 and 2 show one image
    batch = pairs(image_ids=image_ids)
    batch.input_ids[4], batch.attention_mask[4] = batch.input_ids[3], batch.attention_mask[3]  # twin captions
    captured = []
    real = model.encoder.encode_pair

    def spy(imgs, ids, mask, image_mask=None):
        captured.append((imgs.detach().clone(), ids.clone(), mask.clone()))
        return real(imgs, ids, mask, image_mask)

    monkeypatch.setattr(model.encoder, "encode_pair", spy)
    caption = text_codes(batch.input_ids * batch.attention_mask).tolist()
    picked_text, picked_image = set(), set()
    torch.manual_seed(0)
    for _ in range(30):
        with torch.no_grad():
            model(batch)
        imgs, ids, mask = captured.pop()
        assert imgs.shape[0] == ids.shape[0] == 4 * B
        torch.testing.assert_close(imgs[:B], batch.images, rtol=0, atol=0)  # positives
        torch.testing.assert_close(ids[2 * B:3 * B], batch.input_ids, rtol=0, atol=0)  # text of negative-image rows
        for i in range(B):
            j = [r for r in range(B) if torch.equal(ids[B + i], batch.input_ids[r])][0]  # negative text's row
            assert torch.equal(mask[B + i], batch.attention_mask[j])
            assert j != i and image_ids[j] != image_ids[i] and caption[j] != caption[i], (i, j)
            k = [r for r in range(B) if torch.equal(imgs[2 * B + i], batch.images[r])]
            assert len(k) == 1 and k[0] != i and image_ids[k[0]] != image_ids[i] and caption[k[0]] != caption[i]
            picked_text.add((i, j))
            picked_image.add((i, k[0]))
    assert len(picked_text) > B and len(picked_image) > B  # sampled, not a fixed choice


def test_hard_negative_rows_picks_every_tensor_by_the_same_draw_with_local_gradient() -> None:
    b = 5
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(b, 8, generator=g), dim=-1)
    ids, mask = text(b, 7)
    rows = torch.arange(b * 3, dtype=torch.float64).reshape(b, 3).requires_grad_()
    torch.manual_seed(1)
    neg = hard_negative_rows(feats, feats, torch.tensor(1.0), ids, mask, [], image_rows=[rows, 10 * rows],
                             text_rows=[ids, mask], global_negatives=False)
    (img_a, img_b), (txt_ids, txt_mask) = neg
    index = (img_a[:, 0] / 3).long()
    torch.testing.assert_close(img_b, 10 * rows[index])  # same draw for every image-side tensor
    assert not (index == torch.arange(b)).any()
    text_index = [[r for r in range(b) if torch.equal(txt_ids[i], ids[r])][0] for i in range(b)]
    assert all(torch.equal(txt_mask[i], mask[text_index[i]]) for i in range(b))
    assert all(text_index[i] != i for i in range(b))
    (img_a.sum() + img_b.sum()).backward()  # one process: picked rows keep their gradient
    assert rows.grad is not None and rows.grad.sum().item() == pytest.approx(11 * 3 * b)


# ---- stagewise: freezing and chaining ----------------------------------------------------------------------

STAGE1 = {"encoder.patch_embed", "encoder.type_embed", "attn_norm", "attn", "ffn_v", "encoder.norm", "mim_head"}
STAGE2 = {"encoder.text_embed", "ffn_l", "mlm_head"}


def part(name: str) -> str:
    """`encoder.transformer.blocks.<i>.<piece>.*` -> piece; `encoder.<module>.*` -> encoder.<module>; else the head."""
    pieces = name.split(".")
    if name.startswith("encoder.transformer.blocks."):
        return pieces[4]
    return ".".join(pieces[:2]) if pieces[0] == "encoder" else pieces[0]


def stage_model(experiment: str, init: str | None = None, seed: int = 0) -> tuple[VLMo, object]:
    cfg = compose_experiment(experiment, *([f"model.init.checkpoint={init}"] if init else []))
    mcfg = cfg.model
    mw = mcfg.multiway
    mw.image_size, mw.patch_size, mw.vocab_size, mw.max_text_len = IMG, PATCH, VOCAB, L
    mcfg.visual_tokenizer = VisualTokenizerConfig(kind="pixels")  # no k-means file here
    mcfg.__post_init__()
    torch.manual_seed(seed)
    model = VLMo(mcfg)
    if init:
        apply_init(model, mcfg.init)
    apply_freeze(model, mcfg.train, mcfg.freeze)
    return model, cfg


def train_steps(model: VLMo, cfg, batch, steps: int) -> None:
    opt = build_optimizer(model, cfg.optimizer)  # the trainer's: requires_grad parameters only, decay groups
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        sum(model(batch).losses.values()).backward()
        opt.step()


def test_stage1_and_stage2_train_exactly_their_parts_and_chain(tmp_path: Path) -> None:
    s1, cfg1 = stage_model("vlmo_tiny_stage1_image")
    trainable = {part(n) for n, p in s1.named_parameters() if p.requires_grad}
    assert trainable == STAGE1, trainable
    train_steps(s1, cfg1, MixedBatch({"images": images()}), 2)
    torch.save(s1.state_dict(), tmp_path / "stage1.pt")
    stage1 = {k: v.clone() for k, v in s1.state_dict().items()}

    s2, cfg2 = stage_model("vlmo_tiny_stage2_text", init=str(tmp_path / "stage1.pt"), seed=1)
    assert {part(n) for n, p in s2.named_parameters() if p.requires_grad} == STAGE2
    assert s1.mlm_head is None and s1.itm_head is None and s2.mim_head is None and s2.itm_head is None
    loaded = s2.state_dict()
    # every stage-2 tensor stage 1 has came from it (its MIM head is dropped); the rest is the MLM head that
    # stage 1 ([mim]) did not build, whose decoder is tied to the loaded word embeddings
    fresh = sorted(k for k in loaded if k not in stage1)
    assert fresh and all(k.startswith("mlm_head.") for k in fresh), fresh
    for k, v in loaded.items():
        if k in stage1:
            assert torch.equal(v, stage1[k]), k
    assert torch.equal(loaded["mlm_head.decoder.weight"], stage1["encoder.text_embed.token_embed.weight"])
    before = {k: v.clone() for k, v in loaded.items()}
    train_steps(s2, cfg2, MixedBatch({"texts": texts()}), 3)
    assert cfg2.optimizer.weight_decay > 0  # decay would move frozen weights if they reached the optimizer
    after = dict(s2.named_parameters())
    for name, p in after.items():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(p, stage1[name]), f"frozen {name} changed"
    # the image path is bit-identical to stage 1: same image embeddings
    x = images().images
    with torch.no_grad():
        torch.testing.assert_close(s2.encoder.encode_image(x), s1.encoder.encode_image(x), rtol=0, atol=0)


# ---- optimisation, FLOPs ---------------------------------------------------------------------------------

def test_adamw_steps_reduce_every_loss_on_a_fixed_mixed_batch() -> None:
    model = build(itm={"hardness_warmup_steps": 1000})  # step buffer stays 0: uniform ITM negatives (tiny from scratch)
    batch = mixed(("pairs", "images", "texts"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    history = defaultdict(list)
    for _ in range(60):
        torch.manual_seed(0)  # the same masks and negatives every step: a fixed objective
        out = model(batch)
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()
        for k, v in out.losses.items():
            history[k].append(v.item())
    assert set(history) == {"itc", "itm", "mlm", "mim"}
    for k, values in history.items():  # measured: each ends at 0.2-0.45 of its start
        assert values[-1] < 0.6 * values[0], (k, values)


@pytest.mark.parametrize("kind", ["pairs", "images", "texts"])
def test_flops_per_sample_matches_flop_counter(kind: str) -> None:
    """Per kind at 2% with every objective on (tests/test_arch_contract.py: 10% on a step of all kinds)."""
    model = build()
    batch = mixed((kind,))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        sum(model(batch).losses.values()).backward()
    n = len(batch)
    assert counter.get_total_flops() / n == pytest.approx(model.flops_per_sample(kind), rel=0.02)
    with pytest.raises(ValueError, match="kind"):
        model.flops_per_sample("video")


def test_encodings_itm_score_and_after_optimizer_step() -> None:
    model = build().eval()
    batch = pairs(4)
    img, txt = model.encode_image(batch.images), model.encode_text(batch.input_ids, batch.attention_mask)
    assert img.shape == txt.shape == (4, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    padded_ids = F.pad(batch.input_ids[:, :L - 2], (0, 2))
    padded_mask = F.pad(batch.attention_mask[:, :L - 2], (0, 2))
    short = model.encode_text(batch.input_ids[:, :L - 2], batch.attention_mask[:, :L - 2])
    torch.testing.assert_close(model.encode_text(padded_ids, padded_mask), short, atol=1e-5, rtol=1e-5)
    score = model.itm_score(batch.images, batch.input_ids, batch.attention_mask)
    assert score.shape == (4,) and ((score > 0) & (score < 1)).all()
    model.config.itm.hardness_warmup_steps = 8
    model.after_optimizer_step(2)
    assert model.step.item() == 2 and model.itm_hardness().item() == pytest.approx(0.25)
    assert math.isclose(build().itm_hardness().item(), 1.0)
