"""`mmpt.load` and `mmpt-export --format mmpt`: every architecture round-trips exactly (checkpoint dir -> load,
checkpoint -> export -> load); the API's methods against the model's own; the README example; and (slow) a tiny
CLIP trained by `mmpt-train` whose zero-shot top-1 is the same from the trainer, `mmpt-eval` and `mmpt.load`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

import mmpt
from mmpt.cli.export import export
from mmpt.data.transforms import EvalTransform
from mmpt.engine.saved_model import training_only_keys
from mmpt.eval.zeroshot import image_folder, load_templates, read_image
from tests.saved_models import save_tag_dir

ARCHS = ["clip", "albef", "coca", "vlmo", "beit3"]
ALBEF_MOMENTUM = ["model.momentum.enabled=true", "model.momentum.queue_size=64"]
TEXTS = ["a small red circle", "a large blue square to the left of a small green cross", "a cross"]
BIN = Path(sys.executable).parent


def pictures(n: int = 3, size: tuple[int, int] = (40, 32)) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def reference_embeddings(model, loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """The original module's embeddings of `pictures()` / TEXTS, through the eval transform by hand."""
    d = loaded.config.data
    pixels = torch.stack([EvalTransform(d.image_size, mean=d.mean, std=d.std)(im) for im in pictures()])
    ids, mask = loaded.tokenizer(TEXTS)
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids, mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_and_mmpt_export_round_trip_exactly(demo_env, tmp_path, arch):
    tag, model = save_tag_dir(tmp_path / "run", arch, ALBEF_MOMENTUM if arch == "albef" else [])
    from_run = mmpt.load(tmp_path / "run")  # the run dir resolves to its newest complete tag
    ref_img, ref_txt = reference_embeddings(model, from_run)
    assert torch.equal(from_run.encode_image(pictures()), ref_img)
    assert torch.equal(from_run.encode_text(TEXTS), ref_txt)
    assert not from_run.model.training and from_run.source == tag

    out = export([str(tag), "--out", str(tmp_path / "export")])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "export.json", "model.safetensors",
                                                      "tokenizer.json"]
    from_export = mmpt.load(out)
    assert torch.equal(from_export.encode_image(pictures()), ref_img)
    assert torch.equal(from_export.encode_text(TEXTS), ref_txt)
    # the files: the unchanged train config, the run's tokenizer, weights without training-only state
    assert OmegaConf.load(out / "config.yaml") == OmegaConf.load(tag / "config.yaml")
    assert (out / "tokenizer.json").read_bytes() == (tag / "tokenizer.json").read_bytes()
    tensors = load_file(str(out / "model.safetensors"))
    expected = set(model.state_dict()) - training_only_keys(model)
    assert set(tensors) == expected and all(t.dtype != torch.bfloat16 for t in tensors.values())
    for k in expected:
        assert torch.equal(tensors[k], model.state_dict()[k]), k
    assert json.loads((out / "export.json").read_text())["step"] == 7
    card = (out / "README.md").read_text()
    params = sum(p.numel() for n, p in model.named_parameters() if n not in training_only_keys(model))
    assert f"# {arch}/tiny" in card and f"{params:,}" in card and "training steps: 7" in card
    assert demo_env["MMPT_DEMO_DIR"] in card  # the training data urls


def test_albef_export_drops_the_momentum_teacher_and_queues(demo_env, tmp_path):
    tag, model = save_tag_dir(tmp_path / "run", "albef", ALBEF_MOMENTUM)
    dropped = training_only_keys(model)
    assert any(k.startswith("teacher.") for k in dropped) and any("queue" in k for k in dropped)
    assert not any(k.startswith(("visual.", "text.", "itm_head.")) for k in dropped)
    out = export([str(tag), "--out", str(tmp_path / "export")])
    assert not any(k.startswith("teacher.") or "queue" in k for k in load_file(str(out / "model.safetensors")))
    # ITM (the student's fusion layers + head) is unchanged by the drop
    loaded, pics = mmpt.load(out), pictures(2)
    ids, mask = loaded.tokenize(TEXTS[:2])
    with torch.no_grad():
        ref = model.itm_score(loaded.pixels(pics), ids, mask)
    assert torch.equal(loaded.itm_score(pics, TEXTS[:2]), ref)


def test_api_methods_match_the_model(demo_env, tmp_path):
    _, model = save_tag_dir(tmp_path / "coca", "coca")
    m = mmpt.load(tmp_path / "coca")
    ids, mask = m.tokenize(TEXTS)
    assert ids.shape == mask.shape == (3, m.config.data.max_text_len) and mask.sum(1).min() > 0
    pic = pictures(1)[0]
    assert m.preprocess(pic).shape == (3, 32, 32)
    assert torch.equal(m.encode_image(pic), m.encode_image(m.pixels([pic])))  # one PIL image or a tensor
    # zero_shot = image embeddings x (normalised mean of normalised prompt embeddings), by hand
    templates = ["a {}", "a small {}"]
    classes = ["circle", "square", "cross"]
    txt = m.encode_text([t.format(c) for c in classes for t in templates]).reshape(3, 2, -1)
    weights = torch.nn.functional.normalize(txt.mean(1), dim=-1)
    torch.testing.assert_close(m.zero_shot(pictures(), classes, templates), m.encode_image(pictures()) @ weights.T,
                               atol=1e-6, rtol=0)
    # captions: the model's own greedy decode, as text
    with torch.no_grad():
        ids_out = model.generate(m.pixels(pictures(2)), max_len=5)
    assert m.generate(pictures(2), max_len=5) == [m.tokenizer.decode(r) for r in ids_out.tolist()]
    with pytest.raises(AttributeError, match="no ITM head"):
        m.itm_score(pictures(1), TEXTS[:1])


def test_itm_score_pairs_rows_and_broadcasts_one_image(demo_env, tmp_path):
    _, model = save_tag_dir(tmp_path / "vlmo", "vlmo")
    m = mmpt.load(tmp_path / "vlmo")
    pic = pictures(1)
    ids, mask = m.tokenize(TEXTS)
    with torch.no_grad():
        ref = model.itm_score(m.pixels(pic).expand(3, -1, -1, -1), ids, mask)
    got = m.itm_score(pic, TEXTS)
    assert got.shape == (3,) and torch.equal(got, ref) and ((got > 0) & (got < 1)).all()
    with pytest.raises(ValueError, match="pairs image i with text i"):
        m.itm_score(pictures(2), TEXTS)
    with pytest.raises(AttributeError, match="cannot generate"):
        m.generate(pic)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mmpt.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint .* or a dir written by `mmpt-export`"):
        mmpt.load(tmp_path)


def test_mmpt_export_user_errors_exit_2(demo_env, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        export([str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    save_tag_dir(tmp_path / "run", "clip")
    monkeypatch.setitem(sys.modules, "mmpt.interop.hf_clip", None)  # as in an install without the HF exporter
    with pytest.raises(SystemExit) as exc:
        export([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: --format hf is unavailable") and "Traceback" not in err


# ---- the README example -----------------------------------------------------------------------------------------
def readme_example() -> str:
    """The python block of README.md's "Use your trained model" section, as a user would paste it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use your trained model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_runs(demo_env, tmp_path, monkeypatch, capsys):
    save_tag_dir(tmp_path / "runs" / "clip_tiny", "clip")
    from mmpt.data.synthetic import render_sample

    (tmp_path / "shape.jpg").write_bytes(render_sample(seed=3, index=0, image_size=32, p_two=0.0)[0])
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip() in {f"tensor([{k}])" for k in range(4)}  # one image, one of the 4 classes


# ---- done-when: a trained tiny CLIP, zero-shot on held-out demo shapes ------------------------------------------

def shape_folder(root: Path, per_shape: int = 16, image_size: int = 32) -> Path:
    """Held-out demo scenes (seed 7; the demo shards use 0 and 1), one large shape each, labelled by shape."""
    from mmpt.data.synthetic import SHAPES, render_sample

    counts = dict.fromkeys(SHAPES, 0)
    index = 0
    while min(counts.values()) < per_shape:
        jpg, _, meta = render_sample(seed=7, index=index, image_size=image_size, p_two=0.0)
        obj = meta["objects"][0]
        if obj["size"] == "large" and counts[obj["shape"]] < per_shape:  # small shapes are ~5 px wide at 32 px
            counts[obj["shape"]] += 1
            (root / obj["shape"]).mkdir(parents=True, exist_ok=True)
            (root / obj["shape"] / f"{index:05d}.jpg").write_bytes(jpg)
        index += 1
    return root


def demo_templates(path: Path) -> Path:
    """Prompt ensemble over the demo's size and colour words: the class weight averages them out."""
    from mmpt.data.synthetic import COLOURS, SIZES

    path.write_text("".join(f"a {size} {colour} {{}}\n" for size in SIZES for colour in COLOURS))
    return path


@pytest.mark.slow
def test_trained_clip_zero_shot_is_identical_in_trainer_mmpt_eval_and_api(demo_env, tmp_path):
    shapes, templates = shape_folder(tmp_path / "shapes"), demo_templates(tmp_path / "templates.txt")
    run = tmp_path / "run"
    zeroshot_args = [f"eval.zeroshot.root={shapes}", f"eval.zeroshot.templates={templates}"]
    train = subprocess.run(
        [str(BIN / "mmpt-train"), "experiment=clip_tiny", "data.image_size=32", "data.batch_size=32",
         "data.num_workers=0", "trainer.max_steps=40", "trainer.log_every=10", "trainer.save_every=40",
         "scheduler.warmup_steps=5", "logger=none", "deepspeed=zero0", "data.eval.urls=null", "eval.every=20",
         *zeroshot_args, f"hydra.run.dir={run}"], env=demo_env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/zeroshot/top1" in r]
    assert [r["step"] for r in evals] == [20, 40]  # eval.every and the end, with no retrieval set configured
    assert not any(k.startswith("eval/retrieval") for r in evals for k in r)
    trained = evals[-1]

    out, bench = tmp_path / "eval.json", tmp_path / "clip_benchmark.json"
    ev = subprocess.run([str(BIN / "mmpt-eval"), f"ckpt={run}", "data.eval.urls=null", *zeroshot_args,
                         f"eval.output={out}", f"eval.zeroshot.output={bench}"],
                        env=demo_env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert not any(k.startswith("retrieval/") for k in evaluated)  # data.eval.urls=null: zero-shot only

    m = mmpt.load(run)
    classes, samples = image_folder(shapes)
    scores = m.zero_shot([read_image(p) for p, _ in samples], classes, str(templates))
    labels = torch.tensor([label for _, label in samples])
    top1 = (scores.argmax(dim=1) == labels).double().mean().item()
    recall = sum((scores.argmax(1)[labels == c] == c).double().mean().item() for c in range(4)) / 4

    assert evaluated["zeroshot/num_images"] == 64 and classes == ["circle", "cross", "square", "triangle"]
    assert evaluated["zeroshot/top1"] == top1 == trained["eval/zeroshot/top1"]
    assert evaluated["zeroshot/mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    assert evaluated["zeroshot/top5"] == 1.0  # 4 classes
    record = json.loads(bench.read_text())
    assert record["metrics"]["acc1"] == top1 and record["task"] == "zeroshot_classification"
    assert record["dataset"] == "shapes" and record["model"] == "clip/tiny" and record["pretrained"].endswith("step_00000040")
    print(f"zero-shot top-1 of the trained tiny CLIP on {len(samples)} held-out shapes: {top1:.3f} (chance 0.25)")

    # the export of the trained run gives the very same scores
    exported = subprocess.run([sys.executable, "-m", "mmpt.cli.export", str(run), "--out", str(tmp_path / "export")],
                              env=demo_env, capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr[-3000:]
    again = mmpt.load(tmp_path / "export").zero_shot([read_image(p) for p, _ in samples], classes, str(templates))
    assert torch.equal(again, scores)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "training steps: 40" in card and "eval/zeroshot/top1" in card


def test_mmpt_eval_zero_shot_only_equals_the_api(demo_env, tmp_path, capsys):
    """In-process `mmpt-eval` with data.eval.urls=null: zero-shot alone, the same numbers as `mmpt.load`."""
    from mmpt.cli.evaluate import evaluate

    tag, _ = save_tag_dir(tmp_path / "run", "albef")
    shapes = shape_folder(tmp_path / "shapes", per_shape=3)
    metrics = evaluate([f"ckpt={tag}", "data.eval.urls=null", f"eval.zeroshot.root={shapes}",
                        "eval.zeroshot.templates=imagenet_openai", "eval.zeroshot.batch_size=5"])
    assert not any(k.startswith("retrieval") for k in metrics) and metrics["zeroshot/num_images"] == 12
    m = mmpt.load(tag)
    m.batch_size = 5  # as the override: the same chunks, so the same floats
    classes, samples = image_folder(shapes)
    scores = m.zero_shot([read_image(p) for p, _ in samples], classes, load_templates("imagenet_openai"))
    labels = torch.tensor([label for _, label in samples])
    assert metrics["zeroshot/top1"] == (scores.argmax(1) == labels).double().mean().item()
    with pytest.raises(SystemExit) as exc:
        evaluate([f"ckpt={tag}", "data.eval.urls=null"])
    assert exc.value.code == 2 and "eval.zeroshot.root=<image folder>" in capsys.readouterr().err


def test_load_in_bfloat16(demo_env, tmp_path):
    save_tag_dir(tmp_path / "run", "clip")
    full, half = mmpt.load(tmp_path / "run"), mmpt.load(tmp_path / "run", dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    for got, ref in ((half.encode_image(pictures()), full.encode_image(pictures())),
                     (half.encode_text(TEXTS), full.encode_text(TEXTS))):
        assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.05  # bf16 keeps ~3 significant digits
    assert half.zero_shot(pictures(), ["circle", "cross"]).shape == (3, 2)


def test_mmpt_export_hf_of_openai_tiny_loads_in_transformers_with_equal_embeddings(demo_env, tmp_path):
    """Done-when: `mmpt-export RUN --format hf` -> transformers.CLIPModel gives mmpt.load's embeddings to 1e-5."""
    transformers = pytest.importorskip("transformers")
    save_tag_dir(tmp_path / "run", "clip/openai_tiny", perturb=0.05)
    export([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf"])
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    m = mmpt.load(tmp_path / "run")
    pixels = m.pixels(pictures())
    ids, mask = m.tokenize(TEXTS)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    torch.testing.assert_close(out.image_embeds, m.encode_image(pictures()), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_embeds, m.encode_text(TEXTS), atol=1e-5, rtol=0)
    # an HF user's path: CLIPProcessor (image processor + tokenizer) from the same dir, on square images of the
    # model's size (HF resizes then crops, mmpt crops and resizes in one resample: equal for square inputs)
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    size = m.config.data.image_size
    squares = [img.resize((size, size)) for img in pictures()]
    inputs = processor(text=TEXTS, images=squares, return_tensors="pt", padding="max_length",
                       max_length=ids.shape[1])
    torch.testing.assert_close(inputs["pixel_values"], m.pixels(squares), atol=1e-5, rtol=0)
    assert torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["attention_mask"], mask)
