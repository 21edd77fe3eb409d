"""Time and memory of a COCO-5k-sized retrieval evaluation with ITM re-ranking, on 1 or N ranks.

    python scripts/bench/eval_coco_scale.py [--images 5000] [--captions 5] [--rerank-k 128] [--data DIR]
    torchrun --nproc_per_node 2 scripts/bench/eval_coco_scale.py ...   (gloo, CPU)

Writes (once, into --data) a synthetic eval set in the layout `mmpt-data from-coco` gives eval shards: one
sample per image, `<key>.json` = {"image_id", "captions": [...]} (the demo scene's caption and 4 rephrasings),
`.txt` = the first caption, 64 px; and a WordPiece tokenizer. Then builds the tiny ALBEF (model=albef/tiny,
random weights: the figures are cost, not quality) and runs the trainer's evaluation (mmpt.eval.runner:
ITC retrieval, then ITM re-ranking of each query's top-k) timing each stage. Prints, per rank, wall time,
peak RSS (resource.getrusage) and the number of ITM pairs it scored, and rank 0's metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

REPHRASE = ("{}", "a photo of {}", "an image showing {}", "a picture with {}", "there is {}")


def write_eval_set(out: Path, images: int, captions: int, image_size: int, shard_size: int = 500) -> None:
    """Form (b) shards + tokenizer.json; skipped when out/tokenizer.json exists (written last)."""
    import webdataset as wds

    from mmpt.data.synthetic import render_sample
    from mmpt.data.tokenizer import train_wordpiece

    if (out / "tokenizer.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    texts = []
    for shard, start in enumerate(range(0, images, shard_size)):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as sink:
            for i in range(start, min(start + shard_size, images)):
                jpg, caption, _ = render_sample(seed=7, index=i, image_size=image_size)
                caps = [REPHRASE[j % len(REPHRASE)].format(caption) for j in range(captions)]
                texts += caps
                sink.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": caps[0],
                            "json": {"image_id": f"bench{i}", "captions": caps}})
    train_wordpiece(texts, vocab_size=200).save(str(out / "tokenizer.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--rerank-k", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256, help="eval loader batch (pairs)")
    ap.add_argument("--data", default="/tmp/mmpt_eval_coco_scale")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mmpt import distributed as mdist
    from mmpt.data.pipeline import build_eval_loader
    from mmpt.data.tokenizer import load_tokenizer
    from mmpt.engine.dist_env import detect_env, init_process_group
    from mmpt.eval.retrieval import embed_eval_set, itm_rerank, retrieval_metrics
    from mmpt.models.albef import build_albef
    from mmpt.models.registry import preset_config

    env = detect_env()
    if env.world_size > 1:
        init_process_group(env, 3600)
    data = Path(args.data) / f"{args.images}x{args.captions}_{args.image_size}px"
    if env.rank == 0:
        started = time.perf_counter()
        write_eval_set(data, args.images, args.captions, args.image_size)
        print(f"data: {data} ({time.perf_counter() - started:.1f} s)", flush=True)
    if env.world_size > 1:
        torch.distributed.barrier()
    max_len = 24
    tok = load_tokenizer(str(data / "tokenizer.json"), max_len)
    torch.manual_seed(0)
    model = build_albef(preset_config("albef", "tiny", vision={"image_size": args.image_size},
                                      text={"vocab_size": tok.vocab_size, "max_text_len": max_len},
                                      momentum={"enabled": False}))
    urls = sorted(str(p) for p in data.glob("*.tar"))
    loader = build_eval_loader(urls, tok, batch_size=args.batch_size, image_size=args.image_size, num_workers=0,
                               rank=env.rank, world_size=env.world_size)
    cpu = torch.device("cpu")
    times, peaks = {}, {}

    def peak_mib() -> int:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    peaks["model_built"] = peak_mib()
    t0 = time.perf_counter()
    emb = embed_eval_set(model, loader, cpu, keep_inputs=True)
    times["embed"] = time.perf_counter() - t0
    peaks["embed"] = peak_mib()
    t = time.perf_counter()
    metrics = retrieval_metrics(emb, [1, 5, 10])
    times["itc_metrics"] = time.perf_counter() - t
    peaks["itc_metrics"] = peak_mib()
    t = time.perf_counter()
    calls = []
    itm_score = model.itm_score

    def counting(images: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return itm_score(images, *rest)

    model.itm_score = counting  # type: ignore[method-assign]
    reranked = itm_rerank(model, emb, args.rerank_k, cpu, score="itm+itc_logit")
    times["itm_rerank"] = time.perf_counter() - t
    peaks["itm_rerank"] = peak_mib()
    t = time.perf_counter()
    metrics.update(retrieval_metrics(emb, [1, 5, 10], prefix="retrieval_itm", rerank=reranked))
    times["itm_metrics"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    assert emb.inputs is not None
    report = {
        "rank": env.rank, "world_size": env.world_size, "images": int(metrics["retrieval/num_images"]),
        "texts": int(metrics["retrieval/num_texts"]), "rerank_k": args.rerank_k,
        "pixels_held": len(emb.inputs.pixels), "itm_pairs_scored": sum(calls),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "peak_rss_mib": peak_mib(), "peak_rss_mib_after": peaks,
    }
    for part in mdist.all_gather_objects(report):
        if env.rank == 0:
            print(json.dumps(part), flush=True)
    if env.rank == 0:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}), flush=True)
    if env.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
