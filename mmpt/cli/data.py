"""`mmpt-data`: make data for mmpt (shards, WordPiece and k-means visual tokenizers) and look at it (show, stats).

Makes synthetic or caption-dataset shards, WordPiece and k-means visual tokenizers; `show` draws a contact sheet
and `stats` counts samples, sizes and what training would skip (mmpt/cli/data_inspect.py).

Caption datasets: `from-coco` (COCO captions / Karpathy split json) and `from-csv` (mmpt/cli/data_captions.py).

Every user error prints one `error: ...` line to stderr and exits non-zero (2), never a traceback.
Add a subcommand by writing `add_X(subparsers)` that sets `handler` and listing it in SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import glob
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mmpt.cli.data_captions import add_from_coco, add_from_csv
from mmpt.cli.data_inspect import add_show, add_stats
from mmpt.data.caption_sources import CaptionSourceError

USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input: reported as `error: <message>` with exit code 2."""


def _synthetic(args: argparse.Namespace) -> int:
    from mmpt.data.shard_writer import brace_pattern
    from mmpt.data.synthetic import SyntheticConfigError, write_shards

    start = time.perf_counter()
    try:
        sizes = write_shards(
            args.out, num_samples=args.num_samples, shard_size=args.shard_size, seed=args.seed,
            image_size=args.image_size, start_index=args.start_index, prefix=args.prefix,
            p_two=args.p_two, jpeg_quality=args.jpeg_quality, progress=True, style=args.style,
        )
    except SyntheticConfigError as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        raise UserError(f"cannot write shards to {args.out}: {exc}") from exc
    seconds = time.perf_counter() - start
    total = sum(sizes.values())
    print(
        f"wrote {total} samples in {len(sizes)} shards ({total / seconds:.0f} samples/s, {seconds:.1f}s) "
        f"to {args.out}: {brace_pattern(args.out, list(sizes), args.prefix)}"
    )
    return 0


def add_synthetic(subparsers) -> None:
    p = subparsers.add_parser(
        "synthetic", help="write synthetic compositional image-text WebDataset shards",
        description="Write scenes of 1-2 coloured shapes with exact captions as img2dataset-layout tar shards.",
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--num-samples", type=int, required=True, help="how many image-caption pairs to write")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar (<= 10000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the scenes (another seed = new scenes)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (square; default 64)")
    p.add_argument("--start-index", type=int, default=0,
                   help="first global sample index (a multiple of --shard-size); use disjoint ranges for held-out sets")
    p.add_argument("--prefix", default="", help="prefix for shard file names and sample keys")
    p.add_argument("--p-two", type=float, default=0.7, help="fraction of scenes with two shapes")
    p.add_argument("--jpeg-quality", type=int, default=90, choices=range(1, 101), metavar="[1-100]",
                   help="JPEG quality of the images (default 90)")
    from mmpt.data.synthetic_styles import STYLES  # light: no numpy/PIL, so `--help` stays fast

    p.add_argument("--style", default="demo", choices=list(STYLES),
                   help="demo: the quickstart's captions and looks; alt: other words, word order, colours, shapes "
                   "and a textured background (data no preset was tuned on)")
    p.set_defaults(handler=_synthetic)


def expand_shards(pattern: str) -> list[str]:
    """Paths from a brace pattern, a glob, or a comma-separated list of either; every file must exist."""
    from braceexpand import braceexpand

    paths: list[str] = []
    for part in _split_top_level_commas(pattern):
        for expanded in braceexpand(part):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise UserError(f"no shard matches {expanded!r} (from --shards {pattern!r}); check the path")
                paths.extend(matches)
            else:
                paths.append(expanded)
    if not paths:
        raise UserError(f"--shards {pattern!r} names no files")
    for path in paths:
        if not Path(path).is_file():
            raise UserError(
                f"shard not found: {path} (from --shards {pattern!r}); fix the path or pattern, "
                "or write shards first, e.g. `mmpt-data synthetic --out DIR --num-samples N`"
            )
    return paths


def _split_top_level_commas(pattern: str) -> list[str]:
    """Split on commas outside braces, so 'a/{0..3}.tar,b/{x,y}.tar' keeps its brace alternatives."""
    parts, depth, current = [], 0, []
    for ch in pattern:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def iter_captions(paths: list[str]) -> Iterator[str]:
    """The `.txt` members of WebDataset tars, in order."""
    for path in paths:
        try:
            with tarfile.open(path, "r") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        yield tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read captions from {path}: {exc}; is it a WebDataset tar?") from exc


def _tokenizer(args: argparse.Namespace) -> int:
    from mmpt.data.tokenizer import SPECIAL_TOKENS, train_wordpiece

    if args.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size must be > {len(SPECIAL_TOKENS)} (the special tokens), got {args.vocab_size}")
    paths = expand_shards(args.shards)
    captions = list(iter_captions(paths))
    if not captions:
        raise UserError(f"no .txt captions in {len(paths)} shard(s) from --shards {args.shards!r}")
    tok = train_wordpiece(captions, args.vocab_size)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
    except OSError as exc:
        raise UserError(f"cannot write tokenizer to {out}: {exc}") from exc
    print(f"trained WordPiece tokenizer (vocab size {tok.get_vocab_size()}) on {len(captions)} captions "
          f"from {len(paths)} shard(s): {out}")
    return 0


def add_tokenizer(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="train a WordPiece tokenizer on the captions of WebDataset shards",
        description="Train an uncased WordPiece tokenizer ([CLS] ... [SEP]) on the .txt members of tar shards.",
    )
    p.add_argument("--shards", required=True,
                   help="brace pattern (DIR/{00000..00009}.tar), glob (DIR/*.tar) or comma-separated list")
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=1000, help="WordPiece vocabulary size, special tokens included")
    p.set_defaults(handler=_tokenizer)


def iter_image_bytes(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """(where, encoded bytes) of the image members (jpg/jpeg/png/webp) of WebDataset tars, in order."""
    from mmpt.data.pipeline import IMAGE_EXTS

    for path in paths:
        try:
            with tarfile.open(path, "r") as tar:
                for member in tar:
                    if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                        yield f"{path}:{member.name}", tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError) as exc:
            reason = " ".join(str(exc).split())  # tarfile's message spans lines; the CLI prints one
            raise UserError(f"cannot read images from {path}: {reason}; is it a WebDataset tar?") from exc


def _read_images(paths: list[str], transform: Callable, max_images: int) -> tuple[list, int]:
    """The first `max_images` decodable images as transformed tensors, and how many were unreadable."""
    import contextlib

    from tqdm import tqdm

    from mmpt.data.transforms import decode_image

    images, bad = [], 0
    with contextlib.closing(iter_image_bytes(paths)) as members, \
            tqdm(total=max_images, unit="img", desc="reading images", dynamic_ncols=True, mininterval=0.5) as bar:
        for _where, data in members:
            try:
                images.append(transform(decode_image(data)))
            except Exception:  # PIL raises many types for a corrupt image; skip it, as the pipeline does
                bad += 1
                continue
            bar.update(1)
            if len(images) >= max_images:
                break
        bar.total = bar.n  # the shards may hold fewer than max_images
    return images, bad


class _KMeansBars:
    """tqdm bars for `fit_kmeans`'s progress callback: one per stage (init, lloyd), inertia per patch."""

    def __init__(self, patches: int) -> None:
        self.patches = patches
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int, inertia: float | None) -> None:
        from tqdm import tqdm

        if stage not in self.bars:
            self.close()
            desc = "k-means++ init" if stage == "init" else "k-means iterations"
            self.bars[stage] = tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=0.5)
        bar = self.bars[stage]
        bar.update(done - bar.n)
        if inertia is not None:
            bar.set_postfix(inertia=f"{inertia / self.patches:.4f}", refresh=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: no CUDA device here; use --device cpu")
    return device


def _visual_tokenizer(args: argparse.Namespace) -> int:
    import torch

    from mmpt.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform
    from mmpt.visual_tokenizer import fit_kmeans_tokenizer

    mean, std = list(args.mean or CLIP_MEAN), list(args.std or CLIP_STD)
    checks = [
        (args.codebook_size >= 1, f"--codebook-size must be >= 1, got {args.codebook_size}"),
        (args.patch_size >= 1 and args.image_size % args.patch_size == 0,
         f"--image-size {args.image_size} must be a positive multiple of --patch-size {args.patch_size}"),
        (args.max_images >= 1 and args.iters >= 1,
         f"--max-images and --iters must be >= 1, got {args.max_images}, {args.iters}"),
        (args.eps >= 0 and min(std) > 0, f"--eps must be >= 0 and --std positive, got {args.eps}, {std}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    device = _device(args.device)
    paths = expand_shards(args.shards)
    # the eval transform (shorter-side resize + centre crop + normalise): the pipeline's decode and
    # normalisation without the random crop, so the codebook sees whole images at the training resolution
    images, bad = _read_images(paths, EvalTransform(args.image_size, mean=mean, std=std), args.max_images)
    patches = len(images) * (args.image_size // args.patch_size) ** 2
    if patches < args.codebook_size:
        raise UserError(
            f"{len(images)} readable image(s) in {len(paths)} shard(s) give {patches} patches, fewer than "
            f"--codebook-size {args.codebook_size}; add shards or lower --codebook-size"
        )
    bars = _KMeansBars(patches)
    try:
        tok, result = fit_kmeans_tokenizer(
            torch.stack(images).to(device), args.codebook_size, args.patch_size, mean, std,
            eps=args.eps, iters=args.iters, seed=args.seed, progress=bars,
        )  # fmt: skip
    finally:
        bars.close()
    try:
        fmt = tok.save(args.out)
    except OSError as exc:
        raise UserError(f"cannot write the codebook to {args.out}: {exc}") from exc
    print(
        f"fitted {args.codebook_size} codes on {patches} patches of {len(images)} images ({bad} unreadable skipped) "
        f"in {result.iterations} iterations, mean squared distance {result.inertia[-1] / patches:.4f}, "
        f"{result.reseeded} empty clusters re-seeded; wrote {fmt} file {args.out}"
    )
    return 0


def add_visual_tokenizer(subparsers) -> None:
    p = subparsers.add_parser(
        "visual-tokenizer", help="fit a k-means visual tokenizer (patch codebook) on the images of shards",
        description="Fit a k-means codebook on per-patch normalised pixel patches of images from local shards "
        "(the first --max-images readable images, in shard order), for masked image modeling targets "
        "(model visual tokenizer kind: kmeans). Deterministic for a seed on a given device.",
    )
    p.add_argument("--shards", required=True,
                   help="brace pattern (DIR/{00000..00009}.tar), glob (DIR/*.tar) or comma-separated list")
    p.add_argument("--codebook-size", type=int, required=True, help="number of codes K (the MIM vocabulary)")
    p.add_argument("--out", required=True, help="output codebook file (safetensors when installed)")
    p.add_argument("--patch-size", type=int, default=8, help="the model's patch size")
    p.add_argument("--image-size", type=int, default=64, help="the training resolution (data.image_size)")
    p.add_argument("--max-images", type=int, default=10000, help="images to fit the k-means codebook on")
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations (stops early once converged)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the k-means fit")
    p.add_argument("--eps", type=float, default=1e-2, help="per-patch normalisation: (x - mean) / (std + eps)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="data.mean (default CLIP's; recorded in the file)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="data.std (default CLIP's; recorded in the file)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.set_defaults(handler=_visual_tokenizer)


SUBCOMMANDS: dict[str, Callable] = {
    "synthetic": add_synthetic, "tokenizer": add_tokenizer, "visual-tokenizer": add_visual_tokenizer,
    "from-coco": add_from_coco, "from-csv": add_from_csv, "show": add_show, "stats": add_stats,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpt-data", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn user errors into `error: ...` + exit code instead of tracebacks."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage + error (or --help)
        return exc.code if isinstance(exc.code, int) else USER_ERROR
    try:
        return args.handler(args)
    except (UserError, CaptionSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
