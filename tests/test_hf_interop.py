"""mmpt CLIP <-> Hugging Face transformers.CLIPModel: export (`export_hf_clip`) and import (`model.init.checkpoint`
= a CLIPModel directory), checked against transformers' own forward on random weights (no download)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mmpt.data.tokenizer import load_tokenizer, train_wordpiece  # noqa: E402
from mmpt.engine.checkpoint import init_checkpoint_source, read_init_checkpoint  # noqa: E402
from mmpt.engine.config import ConfigError  # noqa: E402
from mmpt.interop.hf_clip import export_hf_clip  # noqa: E402
from mmpt.models.pretrained import InitConfig, apply_init  # noqa: E402
from mmpt.models.registry import build_model, preset_config  # noqa: E402

CAPTIONS = ["a red circle on a blue square", "two green triangles", "a big yellow star next to a small circle",
            "three small blue squares in a row", "an orange ring"] * 10  # fmt: skip
QUERIES = ["a red circle", "two green triangles next to a big yellow star on a blue square", "two small rings"]
TOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_wordpiece(CAPTIONS, vocab_size=120).save(str(path))
    return path


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every tensor (LayerNorms, biases, positions, logit scale too), so a mis-mapped one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def tiny_clip(vocab: int, max_len: int = 32, **overrides: Any) -> nn.Module:
    text = {"vocab_size": vocab, "max_text_len": max_len}
    return randomise_(build_model(preset_config("clip", "openai_tiny", text=text, **overrides)))


def hf_embeddings(hf: nn.Module, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, pixel_values=images)
    return out.image_embeds, out.text_embeds, hf.logit_scale.detach().exp()


def assert_same_as_hf(model: nn.Module, hf: nn.Module, vocab_size: int = 120) -> None:
    """mmpt's image and text embeddings and logit scale equal transformers' (padded captions, random images)."""
    ids, mask = captions(vocab_size, 3)
    images = torch.randn(2, 3, 32, 32)
    image_emb, text_emb, scale = hf_embeddings(hf, images, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), image_emb, atol=TOL, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, mask), text_emb, atol=TOL, rtol=0)
        torch.testing.assert_close(model.itc.scale(), scale, atol=TOL, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"quick_gelu": False, "vision": {"patch_bias": True}}],
                         ids=["openai_tiny", "gelu_patch_bias"])
def test_export_loads_in_transformers_with_equal_embeddings(
    tokenizer_file: Path, tmp_path: Path, overrides: dict[str, Any]
) -> None:
    tok = load_tokenizer(str(tokenizer_file), 32)
    model = tiny_clip(tok.vocab_size, **overrides)
    export_hf_clip(model, tokenizer_file, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.text_config.hidden_act == ("gelu" if overrides else "quick_gelu")
    ids, mask = tok(QUERIES)
    assert mask.sum(1).unique().numel() == len(QUERIES)  # padded to different lengths
    images = torch.randn(3, 3, 32, 32)
    image_emb, text_emb, scale = hf_embeddings(hf, images, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(image_emb, model.encode_image(images), atol=TOL, rtol=0)
        torch.testing.assert_close(text_emb, model.encode_text(ids, mask), atol=TOL, rtol=0)
        torch.testing.assert_close(scale, model.itc.scale(), atol=TOL, rtol=0)


def test_exported_tokenizer_gives_mmpt_ids(tokenizer_file: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(tokenizer_file), 16)
    export_hf_clip(tiny_clip(tok.vocab_size, max_len=16), tokenizer_file, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [*QUERIES, "a very long caption " * 10]
    enc = hf_tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ids, mask = tok(texts)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    assert hf_tok.model_max_length == 16 and hf_tok.eos_token == "[SEP]" and hf_tok.pad_token == "[PAD]"


@pytest.mark.parametrize("preset,overrides,says", [
    ("tiny", {}, "text_causal=false"),
    ("openai_tiny", {"vision": {"pre_norm": False}}, "pre_layrnorm"),
    ("openai_tiny", {"tokens": {"eos": 2, "bos": 3}}, "EOS id is 2"),
])  # fmt: skip
def test_unsupported_configurations_get_one_clear_error(tmp_path: Path, preset: str, overrides: dict, says: str) -> None:
    model = build_model(preset_config("clip", preset, **overrides))
    with pytest.raises(ConfigError, match=says) as err:
        export_hf_clip(model, None, tmp_path / "hf")
    assert "clip/openai_tiny" in str(err.value) and "Hugging Face CLIPModel" in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_other_architectures(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CLIP only, not CoCa"):
        export_hf_clip(build_model(preset_config("coca", "tiny")), None, tmp_path)


# ---- import ----------------------------------------------------------------------------------------------
def random_hf_clip(act: str = "quick_gelu", vocab: int = 120, eos: int = 3) -> nn.Module:
    """A random HF CLIPModel of openai_tiny's geometry (transformers' own init, LayerNorms perturbed)."""
    torch.manual_seed(1)
    tower = {"hidden_act": act, "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 32}
    cfg = transformers.CLIPConfig(
        text_config={**tower, "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 128,
                     "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": eos},
        vision_config={**tower, "hidden_size": 64, "intermediate_size": 256, "image_size": 32, "patch_size": 8},
        projection_dim=32, logit_scale_init_value=3.0,
    )  # fmt: skip
    return randomise_(transformers.CLIPModel(cfg), seed=1)


def captions(vocab: int, eos: int, lengths: tuple[int, ...] = (5, 12, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[CLS] words [SEP]` id rows (ids 5.. are words), one EOS each."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.zeros(len(lengths), 32, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, vocab, (n,), generator=gen)
        ids[row, 0], ids[row, n - 1] = 2, eos
    return ids, (ids != 0).long()


def import_into(model: nn.Module, source: Path) -> list:
    return apply_init(model, InitConfig(checkpoint=str(source)), read_init_checkpoint)


def test_hf_clip_directory_imports_through_model_init(tmp_path: Path) -> None:
    hf = random_hf_clip()
    hf.save_pretrained(tmp_path / "hf")
    assert init_checkpoint_source(tmp_path / "hf") == tmp_path / "hf"  # the launch check accepts the directory
    model = build_model(preset_config("clip", "openai_tiny", text={"vocab_size": 120})).eval()
    (report,) = import_into(model, tmp_path / "hf")
    assert report.missing == [] and report.unexpected == []
    assert len(report.mapped) == len(model.state_dict())
    assert_same_as_hf(model, hf)


def test_legacy_eos_id_two_pools_the_same_token(tmp_path: Path) -> None:
    """HF configs with eos_token_id=2 pool the argmax id; with EOS the largest id (OpenAI's BPE) that is
    mmpt's last real token too."""
    vocab = 120
    hf = random_hf_clip(eos=2, vocab=vocab)
    hf.save_pretrained(tmp_path / "hf")
    model = build_model(preset_config("clip", "openai_tiny", text={"vocab_size": vocab},
                                      tokens={"pad": 0, "bos": 1, "eos": vocab - 1}))
    import_into(model.eval(), tmp_path / "hf")
    ids, mask = captions(vocab - 1, vocab - 1)
    _, text_emb, _ = hf_embeddings(hf, torch.randn(1, 3, 32, 32), ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, mask), text_emb, atol=TOL, rtol=0)


def test_export_then_import_round_trips_every_tensor(tokenizer_file: Path, tmp_path: Path) -> None:
    src = tiny_clip(120)
    export_hf_clip(src, None, tmp_path / "hf")
    dst = build_model(preset_config("clip", "openai_tiny", text={"vocab_size": 120}))
    import_into(dst, tmp_path / "hf" / "model.safetensors")  # a weights file beside its config.json works too
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_import_refuses_a_model_that_would_compute_something_else(tmp_path: Path) -> None:
    random_hf_clip().save_pretrained(tmp_path / "hf")
    gelu = build_model(preset_config("clip", "openai_tiny", text={"vocab_size": 120}, quick_gelu=False))
    with pytest.raises(ValueError, match="hidden_act is 'quick_gelu': set model.quick_gelu=true"):
        import_into(gelu, tmp_path / "hf")
    bidirectional = build_model(preset_config("clip", "tiny", text={"vocab_size": 120}))
    with pytest.raises(ValueError, match="text_causal=true.*pre_norm=true"):
        import_into(bidirectional, tmp_path / "hf")


def test_shape_mismatch_names_the_key_and_both_shapes_and_writes_nothing(tmp_path: Path) -> None:
    random_hf_clip().save_pretrained(tmp_path / "hf")
    model = build_model(preset_config("clip", "openai_tiny", text={"vocab_size": 100}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"text\.embed\.token_embed\.weight: model \(100, 32\), checkpoint \(120, 32\)"):
        import_into(model, tmp_path / "hf")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_openai_b16_preset_has_every_shape_of_hf_clip_vit_b16() -> None:
    """OpenAI CLIP ViT-B/16's published geometry in transformers' terms: the preset maps onto it tensor by tensor
    through the export table, with the same parameter count (meta tensors: no memory)."""
    from mmpt.interop.hf_clip import _layers, hf_clip_pairs, hf_export_problems

    with torch.device("meta"):
        model = build_model(preset_config("clip", "openai_b16"))
        hf = transformers.CLIPModel(transformers.CLIPConfig(
            text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                         "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
            vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                           "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu"},
            projection_dim=512))  # fmt: skip
    assert hf_export_problems(model) == []
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters()) == 149_620_737
    ours, theirs = model.state_dict(), hf.state_dict()
    pairs = hf_clip_pairs(*_layers(model))
    assert {k for p in pairs for k in p.other} == {k for k in theirs if not k.endswith("position_ids")}
    assert {p.mmpt for p in pairs} == set(ours) - {"visual.patch_embed.proj.bias"}  # openai_b16 has none
    for pair in pairs:
        shapes = [theirs[k].shape for k in pair.other]
        if len(shapes) > 1:  # q, k, v stacked
            assert ours[pair.mmpt].shape == (sum(s[0] for s in shapes), *shapes[0][1:]), pair
        elif pair.kind == "reshape":
            assert ours[pair.mmpt].numel() == shapes[0].numel(), pair
        else:
            assert ours[pair.mmpt].shape == shapes[0], pair


def test_openai_tiny_trains_one_step_and_ignores_right_padding() -> None:
    from mmpt.data.batch import Batch

    model = build_model(preset_config("clip", "openai_tiny"))
    ids, mask = captions(1000, 3, lengths=(5, 12, 32))
    batch = Batch(images=torch.randn(3, 3, 32, 32), input_ids=ids, attention_mask=mask)
    loss = model(batch).losses["itc"]
    loss.backward()
    assert torch.isfinite(loss) and model.visual.norm_pre.weight.grad is not None
    assert isinstance(model.text.transformer.blocks[0].mlp.act, type(model.visual.transformer.blocks[0].mlp.act))
    with torch.no_grad():
        short = model.encode_text(ids[:1, :8], mask[:1, :8])
        torch.testing.assert_close(short, model.encode_text(ids[:1], mask[:1]), atol=1e-6, rtol=0)


# ---- through the real CLI ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_mmpt_train_starts_from_a_hf_clip_directory(demo_env: dict[str, str], tmp_path: Path) -> None:
    """`model.init.checkpoint=<CLIPModel dir>` in mmpt-train: every tensor mapped and logged; a layout the model
    cannot reproduce is one `error:` line, exit 2."""
    import subprocess
    import sys

    hf = random_hf_clip(vocab=1000)  # tokenizer=demo's embedding rows
    hf.config.text_config.max_position_embeddings = 24  # data.max_text_len of experiment=clip_tiny
    hf = randomise_(transformers.CLIPModel(hf.config))
    hf.save_pretrained(tmp_path / "hf")
    base = [str(Path(sys.executable).parent / "mmpt-train"), "experiment=clip_tiny", "model=clip/openai_tiny",
            "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=2",
            "trainer.save_every=2", "eval.at_end=false", "logger=none", "deepspeed=zero0",
            f"model.init.checkpoint={tmp_path / 'hf'}"]  # fmt: skip
    proc = subprocess.run([*base, f"hydra.run.dir={tmp_path / 'run'}"], env=demo_env, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    n = len(build_model(preset_config("clip", "openai_tiny")).state_dict())  # every tensor of the model
    assert f"pretrained HF CLIPModel from {tmp_path / 'hf'}: {n} tensors mapped" in log
    assert "0 missing (left at initialisation)" in log and "0 unexpected (not used)" in log
    bad = subprocess.run([*base, "model.quick_gelu=false", f"hydra.run.dir={tmp_path / 'bad'}"], env=demo_env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "set model.quick_gelu=true" in bad.stderr
