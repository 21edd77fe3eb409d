"""Evaluation on 2 gloo ranks gives exactly the 1-rank metrics (retrieval, ITM re-ranking, captioning), while
each rank holds only the pixels of the images in its own shards."""
from __future__ import annotations

import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from mmpt.data.pipeline import build_eval_loader
from mmpt.data.tokenizer import load_tokenizer, train_wordpiece
from mmpt.engine.config import EvalConfig
from mmpt.eval import runner
from mmpt.eval.runner import evaluate_model
from mmpt.models.albef import build_albef
from mmpt.models.coca import build_coca
from mmpt.models.registry import preset_config
from tests.dist_helpers import run_ranks

pytestmark = pytest.mark.slow

WORDS = "a red blue green small big cat dog bird on the left right of".split()
SHARDS, PER_SHARD, CAPTIONS, SIZE, VOCAB, L = 4, 6, 5, 32, 100, 12
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def caption(i: int, j: int) -> str:
    rng = random.Random(i * 10 + j)
    return " ".join(rng.choice(WORDS) for _ in range(3 + (i + j) % 4))


def save_tokenizer(out_dir: Path) -> None:
    """Trained once and loaded by every process: WordPiece training may number equally frequent pieces
    differently from one process to the next."""
    texts = [caption(i, j) for i in range(SHARDS * PER_SHARD) for j in range(CAPTIONS)]
    train_wordpiece(texts, vocab_size=VOCAB).save(str(out_dir / "tokenizer.json"))


def models() -> dict[str, Any]:
    torch.manual_seed(0)
    albef = build_albef(preset_config("albef", "tiny", vision={"image_size": SIZE},
                                      text={"vocab_size": VOCAB, "max_text_len": L}, momentum={"enabled": False}))
    torch.manual_seed(1)
    coca = build_coca(preset_config("coca", "tiny", vision={"image_size": SIZE},
                                    text={"vocab_size": VOCAB, "max_text_len": L}))
    return {"albef": albef, "coca": coca}


def evaluate_all(out_dir: str, rank: int, world: int) -> dict[str, Any]:
    """Metrics of both models on the shards in out_dir, and how many images' pixels this rank held."""
    urls = sorted(str(p) for p in Path(out_dir).glob("eval-*.tar"))
    tok = load_tokenizer(str(Path(out_dir) / "tokenizer.json"), L)
    cfg = EvalConfig(ks=[1, 5, 10], rerank_k=8, caption_max_images=100, caption_max_len=6, caption_beams=2,
                     caption_samples=3)
    held: list[int] = []
    original = runner.embed_eval_set

    def spy(*args: Any, **kwargs: Any) -> Any:
        emb = original(*args, **kwargs)
        held.append(len(emb.inputs.pixels) if emb.inputs is not None else 0)
        return emb

    runner.embed_eval_set = spy  # type: ignore[assignment]
    try:
        out: dict[str, Any] = {}
        for name, model in models().items():
            # one batch = one shard (6 images x 5 captions): the same batches whatever the number of ranks
            loader = build_eval_loader(urls, tok, batch_size=PER_SHARD * CAPTIONS, image_size=SIZE, num_workers=0,
                                       rank=rank, world_size=world, mean=MEAN, std=STD)
            result = evaluate_model(model, loader, tok, cfg, torch.device("cpu"), None, MEAN, STD)
            out[name] = result.metrics
            out[f"{name}_samples"] = [(s.generated, s.reference, s.image.tobytes()) for s in result.samples]
    finally:
        runner.embed_eval_set = original  # type: ignore[assignment]
    out["held"] = held
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        torch.save(evaluate_all(out_dir, rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_one_rank_metrics(tmp_path: Path, write_shards, image_bytes) -> None:
    shards = []
    for s in range(SHARDS):
        samples = []
        for p in range(PER_SHARD):
            i = s * PER_SHARD + p
            colour = ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 120) % 256)
            samples.append({"__key__": f"{i:06d}", "jpg": image_bytes(colour, (SIZE, SIZE)), "txt": caption(i, 0),
                            "json": {"image_id": f"img{i}", "captions": [caption(i, j) for j in range(CAPTIONS)]}})
        shards.append(samples)
    write_shards(shards, name="eval")
    save_tokenizer(tmp_path)
    one = evaluate_all(str(tmp_path), 0, 1)
    two = run_ranks(_worker, tmp_path, 2)
    n_img = SHARDS * PER_SHARD
    assert one["albef"]["retrieval/num_images"] == n_img and one["albef"]["retrieval/num_texts"] == n_img * CAPTIONS
    assert "retrieval_itm/t2i_r1" in one["albef"] and "caption/cider" in one["coca"]
    for r in two:
        for name in ("albef", "coca", "albef_samples", "coca_samples"):
            assert r[name] == one[name], (name, r[name], one[name])
    # pixels never gathered: each rank held the images of its 2 shards only, the single process all 24
    assert one["held"] == [n_img, n_img]
    assert [r["held"] for r in two] == [[n_img // 2] * 2, [n_img // 2] * 2]
