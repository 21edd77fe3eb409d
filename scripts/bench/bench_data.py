"""Train-loader throughput per worker: mmpt's train loader vs a bare webdataset loop on the same JPEG shards.

    python scripts/bench/bench_data.py [--image-size 224] [--source-size 224] [--workers 1 2] [--batches 12]
        [--rounds 5] [--batch 64] [--samples 512] [--no-draft-side]

Shards: `--samples` synthetic scenes of `--source-size` px written with mmpt's shard writer (what
`mmpt-data synthetic --image-size N` writes) into a temporary directory; a WordPiece tokenizer trained on their
captions. Sides, each an infinite shuffled stream of batches of `--batch` in DataLoader workers:
  bare        webdataset (resampled shards, 1000-sample shuffle) -> PIL decode -> random resized crop (scale
              0.5-1, aspect 3/4-4/3, bicubic) -> tensor -> normalise; batches tokenized with the same tokenizer
  mmpt        mmpt.data.pipeline.build_train_loader (its default: JPEG draft decoding when the crop allows)
  mmpt-full   the same loader with draft decoding off (TrainTransform(draft=False)), unless --no-draft-side
Each round builds every side's loader afresh, skips 2 batches (worker start-up) and times the next `--batches`;
rounds alternate the sides so machine noise hits all. Prints medians of samples/s (wall clock), per worker,
the CPU seconds per 1000 samples of the workers (their user+sys time, steadier on a loaded machine), each side's
ratio to bare, and the 2-vs-1-worker scaling.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import resource
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def bare_loader(urls: list[str], tokenizer, batch: int, size: int, workers: int, seed: int) -> DataLoader:
    """What a user writes with webdataset and PIL alone: the baseline."""
    import webdataset as wds
    from PIL import Image

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    rng = random.Random(seed)

    def crop_box(w: int, h: int) -> tuple[int, int, int, int]:
        for _ in range(10):
            area = w * h * rng.uniform(0.5, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return left, top, left + cw, top + ch
        return 0, 0, w, h

    def image(sample: dict) -> tuple[torch.Tensor, str]:
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=crop_box(*img.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - mean) / std, sample["txt"].decode("utf-8")

    def collate(items: list) -> dict:
        images, texts = zip(*items)
        ids, mask = tokenizer(list(texts))
        return {"images": torch.stack(images), "input_ids": ids, "attention_mask": mask}

    ds = (wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed).shuffle(1000)
          .map(image).batched(batch, collation_fn=collate, partial=False))
    return DataLoader(ds, batch_size=None, num_workers=workers)


def make_data(root: Path, samples: int, source_size: int):
    from mmpt.data.synthetic import write_shards
    from mmpt.data.tokenizer import TextTokenizer, train_wordpiece

    write_shards(root, samples, min(samples, 256), seed=0, image_size=source_size)
    urls = sorted(str(p) for p in root.glob("*.tar"))
    captions = []
    for url in urls:
        with tarfile.open(url) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    return urls, TextTokenizer(train_wordpiece(captions, 1000), max_len=32)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(make: Callable[[], Iterable], batches: int, batch: int) -> tuple[float, float]:
    """(samples/s by wall clock over `batches` after 2 warm-up batches, worker CPU s per 1000 samples)."""
    cpu = children_cpu()
    loader = make()
    it = iter(loader)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - start
    del it, loader  # joins the workers, so their CPU time lands in RUSAGE_CHILDREN
    return batches * batch / wall, (children_cpu() - cpu) / ((batches + 2) * batch) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224, help="model input side (crop output)")
    ap.add_argument("--source-size", type=int, default=224, help="side of the JPEGs in the shards")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--no-draft-side", action="store_true", help="skip the mmpt side with draft decoding off")
    args = ap.parse_args()

    from mmpt.data.pipeline import build_train_loader

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        urls, tokenizer = make_data(Path(tmp), args.samples, args.source_size)

        def mmpt_side(workers: int, draft: bool) -> Callable[[], Iterable]:
            def make() -> Iterable:
                loader = build_train_loader(urls, tokenizer, batch_size=args.batch, image_size=args.image_size,
                                            num_workers=workers, seed=0, rank=0, world_size=1, pin_memory=False)
                if not draft:  # the dataset's transform, reached through the loader it built
                    loader.dataloader.dataset.source.transform.draft = False
                return loader
            return make

        print(f"shards: {args.samples} JPEGs of {args.source_size} px -> {args.image_size} px crops | batch "
              f"{args.batch} | {args.batches} timed batches x {args.rounds} rounds | samples/s medians (wall)")
        rates: dict[tuple[str, int], float] = {}
        for workers in args.workers:
            sides: dict[str, Callable[[], Iterable]] = {
                "bare": lambda w=workers: bare_loader(urls, tokenizer, args.batch, args.image_size, w, seed=0),
                "mmpt": mmpt_side(workers, draft=True),
            }
            if not args.no_draft_side:
                sides["mmpt-full"] = mmpt_side(workers, draft=False)
            wall: dict[str, list[float]] = {k: [] for k in sides}
            cpu: dict[str, list[float]] = {k: [] for k in sides}
            for _ in range(args.rounds):
                for name, make in sides.items():
                    w, c = timed(make, args.batches, args.batch)
                    wall[name].append(w)
                    cpu[name].append(c)
            bw, bc = statistics.median(wall["bare"]), statistics.median(cpu["bare"])
            for name in sides:
                w, c = statistics.median(wall[name]), statistics.median(cpu[name])
                rates[(name, workers)] = w
                print(f"workers {workers} | {name:9s}: {w:7.1f} samples/s ({w / workers:6.1f} per worker) | "
                      f"ratio vs bare {w / bw:.3f} | worker CPU {c:5.2f} s/1000 samples (bare / this {bc / c:.3f})")
        if len(args.workers) > 1:
            lo, hi = min(args.workers), max(args.workers)
            for name in sorted({n for n, _ in rates}):
                print(f"scaling {name:9s}: {hi} vs {lo} workers {rates[(name, hi)] / rates[(name, lo)]:.2f}x "
                      f"(linear {hi / lo:.2f}x)")
        print(json.dumps({f"{n}@{w}": round(r, 1) for (n, w), r in rates.items()}))


if __name__ == "__main__":
    main()
