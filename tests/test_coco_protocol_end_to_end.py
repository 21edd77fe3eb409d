"""Issue 12's first done-when line, as a user would do it: a COCO-layout captions file with 5 captions per
image -> `mmpt-data from-coco` -> `mmpt-eval` gives R@1/5/10 equal to a hand computation (the Karpathy/COCO
protocol) from `mmpt.load(...).encode_image/encode_text`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mmpt
from mmpt.cli.data import main as mmpt_data
from mmpt.cli.evaluate import evaluate
from mmpt.cli.export import export
from tests.saved_models import save_tag_dir

N_IMAGES, CAPTIONS_PER_IMAGE = 12, 5
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "left", "right", "top", "bottom"]


def write_coco(root: Path) -> tuple[Path, Path, dict[int, list[str]]]:
    """JPEG images (bytes kept by from-coco) of random noise, and 5 captions of demo words each."""
    rng = np.random.default_rng(0)
    images = root / "val2017"
    images.mkdir(parents=True)
    captions: dict[int, list[str]] = {}
    entries, annotations = [], []
    for i in range(N_IMAGES):
        image_id = 1000 + i
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
        captions[image_id] = [" ".join(rng.choice(WORDS, 4)) + f" {j}" for j in range(CAPTIONS_PER_IMAGE)]
        entries.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": 40, "width": 48})
        annotations += [{"id": 10 * image_id + j, "image_id": image_id, "caption": c}
                        for j, c in enumerate(captions[image_id])]
    path = root / "captions_val2017.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path, images, captions


def recall(ranked_hits: torch.Tensor, k: int) -> float:
    """ranked_hits `q c` (bool, candidates in ranked order): share of queries with a hit in the top k."""
    return ranked_hits[:, :k].any(dim=1).double().mean().item()


def test_from_coco_then_mmpt_eval_equals_hand_computed_protocol(demo_env, tmp_path):
    annotations, image_dir, captions = write_coco(tmp_path)
    out = tmp_path / "coco_eval"
    assert mmpt_data(["from-coco", "--annotations", str(annotations), "--images", str(image_dir), "--out", str(out),
                      "--split", "val", "--workers", "1"]) == 0
    run_dir = tmp_path / "run"
    save_tag_dir(run_dir, "clip", perturb=0.05)
    shards = sorted(out.glob("*.tar"))
    urls = f"{out}/{{{shards[0].stem}..{shards[-1].stem}}}.tar"
    metrics = evaluate([f"ckpt={run_dir}", f"data.eval.urls={urls}", "eval.ks=[1,5,10]"])

    m = mmpt.load(run_dir)
    ids = sorted(captions)
    image_emb = m.encode_image([Image.open(image_dir / f"{i}.jpg") for i in ids])  # `i e`
    texts = [c for i in ids for c in captions[i]]
    owner = torch.tensor([n for n in range(len(ids)) for _ in range(CAPTIONS_PER_IMAGE)])  # text -> image index
    text_emb = m.encode_text(texts)  # `t e`
    sims = text_emb @ image_emb.T  # `t i`
    t2i_hits = owner[:, None] == sims.argsort(dim=1, descending=True)  # the caption's own image, in ranked order
    i2t_order = sims.T.argsort(dim=1, descending=True)  # `i t`: all captions ranked per image
    i2t_hits = owner[i2t_order] == torch.arange(len(ids))[:, None]  # any caption of the image
    for k in (1, 5, 10):
        assert abs(metrics[f"retrieval/t2i_r{k}"] - recall(t2i_hits, k)) < 1e-6, k  # float32 metric; one query moves it by 1/60
        assert abs(metrics[f"retrieval/i2t_r{k}"] - recall(i2t_hits, k)) < 1e-6, k  # float32 metric; one query moves it by 1/60
    assert metrics["retrieval/num_images"] == N_IMAGES
    assert metrics["retrieval/num_texts"] == N_IMAGES * CAPTIONS_PER_IMAGE
    # not a degenerate case: the protocols differ here (a random model would score R@10 of 10/12 on images)
    assert recall(t2i_hits, 10) < 1.0 or recall(i2t_hits, 1) < 1.0
    # an mmpt-export dir evaluates the same (mmpt-eval and mmpt.load share one reader)
    exported = export([str(run_dir), "--out", str(tmp_path / "exported")])
    again = evaluate([f"ckpt={exported}", f"data.eval.urls={urls}", "eval.ks=[1,5,10]"])
    assert {k: v for k, v in again.items() if k != "checkpoint"} == {k: v for k, v in metrics.items() if k != "checkpoint"}
