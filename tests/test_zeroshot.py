"""Zero-shot classification: class weights and metrics against hand computations, ImageFolder and .cls shards
giving the same answer, config errors, and 2 gloo ranks giving exactly the 1-rank metrics (no hang when a rank
has no image)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from tokenizers import Tokenizer

from mmpt.data.tokenizer import TextTokenizer, train_wordpiece
from mmpt.data.transforms import EvalTransform
from mmpt.engine.config import ConfigError
from mmpt.engine.run_setup import validate
from mmpt.eval import zeroshot
from mmpt.eval.zeroshot import ZeroShotConfig, class_weights, classification_metrics, zeroshot_eval
from mmpt.models.registry import build_model, preset_config
from tests.dist_helpers import run_ranks
from tests.saved_models import SINGLE, TINY_DATA, composed

IMAGE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
COLOURS = {"00_red": [(220, 30, 30), (200, 60, 40)], "01_green": [(30, 200, 40)],
           "02_blue": [(30, 40, 220), (60, 60, 200), (10, 90, 250)]}
NAMES = ["red", "green", "blue"]


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = preset_config("clip", "tiny", vision={"image_size": IMAGE, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                        text={"width": 32, "layers": 1, "heads": 2, "vocab_size": 64, "max_text_len": 12},
                        contrastive={"embed_dim": 16})
    return build_model(cfg).eval()


def tokenizer() -> TextTokenizer:
    words = ["a photo of a red green blue thing", "the small large picture of"] * 5
    return TextTokenizer(train_wordpiece(words, vocab_size=64), max_len=12)


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, colours: dict[str, list[tuple[int, int, int]]] = COLOURS) -> Path:
    for cls, rgbs in colours.items():
        (root / cls).mkdir(parents=True)
        for i, rgb in enumerate(rgbs):
            (root / cls / f"{i}.png").write_bytes(png(rgb))
    return root


def test_class_weights_are_the_normalised_mean_of_normalised_prompt_embeddings():
    model, tok = tiny_clip(), tokenizer()
    templates = ["a photo of a {}.", "a {}", "the large {} picture"]
    got = class_weights(model, tok, NAMES, templates, batch_size=4)  # chunks cross class boundaries
    assert got.shape == (16, 3)
    for c, name in enumerate(NAMES):
        rows = []
        with torch.no_grad():
            for t in templates:
                ids, mask = tok([t.format(name)])
                e = model.encode_text(ids, mask)[0]
                rows.append(e / e.norm())
        mean = torch.stack(rows).mean(dim=0)
        torch.testing.assert_close(got[:, c], mean / mean.norm(), atol=1e-6, rtol=0)
    assert torch.allclose(got.norm(dim=0), torch.ones(3), atol=1e-6)


def test_metrics_hand_computed():
    labels = np.array([0, 0, 1, 2, 2, 2])
    ranking = np.array([[0, 1, 2], [1, 2, 0], [1, 0, 2], [2, 0, 1], [0, 1, 2], [2, 1, 0]])  # n x classes, best first
    m = classification_metrics(ranking, labels, num_classes=3)
    assert m["zeroshot/top1"] == pytest.approx(4 / 6)
    assert m["zeroshot/top5"] == 1.0  # k capped at the 3 classes
    assert m["zeroshot/mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 1 + 2 / 3) / 3)
    assert m["zeroshot/num_images"] == 6
    # top-5 out of 7 classes: the label must be in the first five columns
    ranking7 = np.array([[6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6]])
    m7 = classification_metrics(ranking7[:, :5], np.array([1, 4]), num_classes=7)
    assert (m7["zeroshot/top1"], m7["zeroshot/top5"]) == (0.0, 0.5)


def test_shipped_templates():
    openai = zeroshot.load_templates("imagenet_openai")
    assert len(openai) == 80 and len(set(openai)) == 80 and all(t.count("{}") == 1 for t in openai)
    assert openai[0] == "a bad photo of a {}." and openai[-1] == "a tattoo of the {}."
    assert "a photo of a {}." in zeroshot.load_templates("default")


def test_bad_templates_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}.\na photo without a slot\n")
    with pytest.raises(ValueError, match="exactly one `{}`.*a photo without a slot"):
        zeroshot.load_templates(str(bad))
    with pytest.raises(FileNotFoundError, match="default, imagenet_openai"):
        zeroshot.load_templates("imagenet")


def test_image_folder_predictions_match_a_per_image_computation(tmp_path):
    """Metrics of `zeroshot_eval` (batched) = a loop that classifies each image on its own."""
    root = image_folder(tmp_path / "colours")
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    model, tok = tiny_clip(), tokenizer()
    cfg = ZeroShotConfig(root=str(root), classnames=str(tmp_path / "names.txt"), templates="default", batch_size=2)
    got = zeroshot_eval(model, tok, cfg, IMAGE, MEAN, STD)
    assert got.classnames == NAMES
    weights = class_weights(model, tok, NAMES, zeroshot.load_templates("default"))
    transform = EvalTransform(IMAGE, mean=MEAN, std=STD)
    preds, labels = [], []
    for label, (cls, rgbs) in enumerate(COLOURS.items()):
        for i in range(len(rgbs)):
            pixels = transform(Image.open(root / cls / f"{i}.png").convert("RGB"))[None]
            with torch.no_grad():
                preds.append(int((model.encode_image(pixels) @ weights).argmax()))
            labels.append(label)
    top1 = np.mean(np.array(preds) == np.array(labels))
    recall = np.mean([np.mean([p == c for p, l in zip(preds, labels) if l == c]) for c in range(3)])
    assert got.metrics["zeroshot/top1"] == pytest.approx(top1)
    assert got.metrics["zeroshot/mean_per_class_recall"] == pytest.approx(recall)
    assert got.metrics["zeroshot/num_images"] == 6


def test_cls_shards_give_the_image_folder_metrics_and_count_bad_samples(tmp_path, write_shards):
    model, tok = tiny_clip(), tokenizer()
    root = image_folder(tmp_path / "colours")
    samples = [{"__key__": f"{label}-{i}", "png": png(rgb), "cls": str(label)}
               for label, rgbs in enumerate(COLOURS.values()) for i, rgb in enumerate(rgbs)]
    bad = [{"__key__": "out-of-range", "png": png((1, 2, 3)), "cls": "7"}, {"__key__": "no-image", "cls": "0"}]
    urls = write_shards([samples[:3] + bad, samples[3:]])
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    names = str(tmp_path / "names.txt")
    folder = zeroshot_eval(model, tok, ZeroShotConfig(root=str(root), classnames=names, batch_size=4), IMAGE, MEAN, STD)
    shards = zeroshot_eval(model, tok, ZeroShotConfig(urls=urls, classnames=names, batch_size=4), IMAGE, MEAN, STD)
    assert zeroshot.resolve_classnames(ZeroShotConfig(root=str(root))) == list(COLOURS)  # no file: the folder names
    assert shards.metrics.pop("zeroshot/skipped") == 2
    assert shards.metrics == folder.metrics


def test_clip_benchmark_json_layout(tmp_path):
    cfg = ZeroShotConfig(root=str(tmp_path / "shapes"), output=str(tmp_path / "out" / "zs.json"))
    metrics = {"zeroshot/top1": 0.5, "zeroshot/top5": 1.0, "zeroshot/mean_per_class_recall": 0.4, "zeroshot/num_images": 8}
    path = zeroshot.write_clip_benchmark_json(cfg, metrics, "clip/tiny", "runs/x/step_10")
    assert json.loads(path.read_text()) == {
        "dataset": "shapes", "model": "clip/tiny", "pretrained": "runs/x/step_10", "task": "zeroshot_classification",
        "metrics": {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.4}, "language": "en"}


@pytest.mark.parametrize("overrides, message", [
    (["eval.zeroshot.root={missing}"], r"eval.zeroshot.root='.*nope' is not a directory"),
    (["eval.zeroshot.root={root}", "eval.zeroshot.classnames={two_names}"],
     r"has 2 names but eval.zeroshot.root=.* has 3 class folders"),
    (["eval.zeroshot.urls={root}/x.tar"], r"eval.zeroshot.urls needs eval.zeroshot.classnames"),
    (["eval.zeroshot.urls={root}/x.tar", "eval.zeroshot.classnames={two_names}"], r"eval.zeroshot.urls: .*do not exist"),
    (["eval.zeroshot.root={root}", "eval.zeroshot.templates=nope"], r"eval.zeroshot.templates='nope': no such file"),
])
def test_config_errors_name_the_key(demo_env, tmp_path, overrides, message):
    root = image_folder(tmp_path / "colours")
    (tmp_path / "two.txt").write_text("a\nb\n")
    fill = {"missing": tmp_path / "nope", "root": root, "two_names": tmp_path / "two.txt"}
    with pytest.raises(ConfigError, match=message):
        validate(composed(["model=clip/tiny", *TINY_DATA, *(o.format(**fill) for o in overrides)]), SINGLE,
                 need_train=False)


def test_valid_zeroshot_config_is_typed(demo_env, tmp_path):
    root = image_folder(tmp_path / "colours")
    prep = validate(composed(["model=clip/tiny", *TINY_DATA, f"eval.zeroshot.root={root}",
                              "eval.zeroshot.templates=imagenet_openai"]), SINGLE, need_train=False)
    zs = prep.cfg.eval.zeroshot
    assert isinstance(zs, ZeroShotConfig) and zs.root == str(root) and zs.templates == "imagenet_openai"


# ---- 2 gloo ranks -----------------------------------------------------------------------------------------------

def _two_rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_clip()
    tok = TextTokenizer(Tokenizer.from_file(str(Path(out_dir) / "tokenizer.json")), max_len=12)
    results = [zeroshot_eval(model, tok, ZeroShotConfig(root=str(Path(out_dir) / name), batch_size=1), IMAGE, MEAN,
                             STD).metrics for name in ("six", "one")]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_metrics(tmp_path):
    image_folder(tmp_path / "six")
    image_folder(tmp_path / "one", {"a": [(200, 20, 20)], "b": []})  # rank 1 gets no image: must not hang
    model, tok = tiny_clip(), tokenizer()
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))  # WordPiece training breaks ties differently per process
    # batch_size 1: each image is encoded alone on either layout, so no float reassociation can flip a near tie
    single = [zeroshot_eval(model, tok, ZeroShotConfig(root=str(tmp_path / n), batch_size=1), IMAGE, MEAN, STD).metrics
              for n in ("six", "one")]
    ranks = run_ranks(_two_rank_worker, tmp_path, world=2)
    assert ranks[0] == ranks[1] == single
    assert single[0]["zeroshot/num_images"] == 6 and single[1]["zeroshot/num_images"] == 1
