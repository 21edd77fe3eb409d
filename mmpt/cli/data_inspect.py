"""`mmpt-data show` (a contact sheet of images with their captions) and `mmpt-data stats` (counts, caption
and image size percentiles, samples training would skip, by reason). The work is in mmpt/data/inspection.py.

Kept apart from mmpt/cli/data.py (which lists these subcommands); user errors are mmpt.cli.data.UserError.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

SHARDS_HELP = ("tar shards: a brace pattern (DIR/{00000..00009}.tar), a glob (DIR/*.tar) or a comma-separated "
               "list of them; quote it for the shell")
KIND_HELP = ("what a sample must hold, as data.sources' kind: pairs (image + caption, the default), images "
             "(captions ignored)")


def _progress(desc: str):
    """A tqdm bar of samples read, on stderr (the report goes to stdout)."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=" samples", dynamic_ncols=True, mininterval=0.5)


def _show(args: argparse.Namespace) -> int:
    from mmpt.cli.data import UserError, expand_shards
    from mmpt.data.inspection import SheetLayout, contact_sheet, sheet_items

    if args.num < 1 or args.tile < 16 or (args.cols is not None and args.cols < 1):
        raise UserError(f"-n must be >= 1, --tile >= 16 and --cols >= 1; got -n {args.num}, --tile {args.tile}, "
                        f"--cols {args.cols}")
    paths = expand_shards(args.shards)
    transform = _transform(args)
    with _progress("reading samples") as bar:
        items, result = sheet_items(paths, args.num, transform, args.kind, args.seed, on_sample=bar.update)
    if not items:
        reasons = ", ".join(f"{r} {n}" for r, n in result.skipped.items()) or "none"
        raise UserError(f"no usable sample with an image in {len(paths)} shard(s) from {args.shards!r} "
                        f"(skipped: {reasons}); check the shards with `mmpt-data stats {args.shards}`")
    cols = args.cols or math.ceil(math.sqrt(args.num))
    layout = SheetLayout(cols=cols, rows=math.ceil(args.num / cols), tile=args.tile)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(items, layout).save(out)
    except (OSError, ValueError) as exc:  # ValueError: an extension PIL cannot write
        raise UserError(f"cannot write --out {out}: {exc}; give a .png or .jpg path in a writable directory") from exc
    w, h = layout.size
    skipped = sum(result.skipped.values())
    print(f"wrote {out} ({w}x{h} px): {len(items)} samples, transform {args.transform}"
          + (f"; {skipped} unusable samples skipped on the way" if skipped else ""))
    return 0


def _transform(args: argparse.Namespace) -> Callable | None:
    from mmpt.cli.data import UserError
    from mmpt.data.transforms import EvalTransform, TrainTransform

    if args.transform == "none":
        return None
    if args.image_size < 1:
        raise UserError(f"--image-size must be >= 1, got {args.image_size}")
    if args.transform == "eval":
        return EvalTransform(args.image_size)
    try:
        return TrainTransform(args.image_size, scale=tuple(args.scale), hflip=args.hflip)
    except ValueError as exc:
        raise UserError(f"--scale {args.scale[0]} {args.scale[1]}: {exc}") from exc


def add_show(subparsers) -> None:
    p = subparsers.add_parser(
        "show", help="write a contact sheet (PNG) of the first images of shards with their captions",
        description="Draw the first N usable samples of the shards (in shard order: what training would keep) "
        "as a grid of images with their captions; --transform train shows them as the model sees them.",
    )
    p.add_argument("shards", metavar="SHARDS", help=SHARDS_HELP)
    p.add_argument("-n", "--num", type=int, default=16, help="how many samples to draw (default 16)")
    p.add_argument("--out", required=True, help="output image, e.g. sheet.png (its directory is created)")
    p.add_argument("--transform", choices=("none", "train", "eval"), default="none",
                   help="none: decoded images as stored; train: the training crop (random resized crop at "
                   "--image-size, --scale, --hflip); eval: resize + centre crop at --image-size")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size for --transform train/eval (default 64)")
    p.add_argument("--scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("LO", "HI"),
                   help="data.rrc_scale for --transform train: crop area fraction range (default 1.0 1.0, the "
                   "default preset's; open_clip uses 0.9 1.0)")
    p.add_argument("--hflip", action="store_true", help="data.hflip for --transform train: random horizontal flips")
    p.add_argument("--seed", type=int, default=0, help="seed of the train transform's random crops (default 0)")
    p.add_argument("--cols", type=int, default=None, help="columns of the grid (default: ceil(sqrt(N)))")
    p.add_argument("--tile", type=int, default=160, help="pixels per image tile (default 160); captions go below")
    p.add_argument("--kind", choices=("pairs", "images"), default="pairs", help=KIND_HELP)
    p.set_defaults(handler=_show)


def _stats(args: argparse.Namespace) -> int:
    from mmpt.cli.data import UserError, expand_shards
    from mmpt.data.inspection import collect_stats, format_stats

    if args.max_text_len is not None and args.max_text_len < 1:
        raise UserError(f"--max-text-len must be >= 1, got {args.max_text_len}")
    count, unit = _token_counter(args.tokenizer)
    paths = expand_shards(args.shards)
    with _progress("reading samples") as bar:
        stats = collect_stats(paths, count, args.kind, on_sample=bar.update)
    print(format_stats(stats, unit, args.max_text_len))
    return 0


def _token_counter(path: str | None) -> tuple[Callable[[str], int], str]:
    """Tokens per caption as the model gets them (special tokens included), or words without a tokenizer."""
    from mmpt.cli.data import UserError

    if path is None:
        return (lambda text: len(text.split())), "words; give --tokenizer for tokens"
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path) if Path(path).is_file() else Tokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers raises its own Exception types for bad files and hub failures
        raise UserError(f"--tokenizer {path!r}: not a readable tokenizer.json file nor a Hugging Face hub name "
                        f"({exc}); train one with `mmpt-data tokenizer --shards PATTERN --out tokenizer.json`") from exc
    tok.no_truncation()
    tok.no_padding()
    return (lambda text: len(tok.encode(text).ids)), f"tokens of {path}, special tokens included"


def add_stats(subparsers) -> None:
    p = subparsers.add_parser(
        "stats", help="count samples and shards, caption and image size percentiles, corrupt samples by reason",
        description="Read every sample of the shards as the training loader would (images decoded) and report "
        "how many are usable, which would be skipped and why, caption lengths and image sizes.",
    )
    p.add_argument("shards", metavar="SHARDS", help=SHARDS_HELP)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json file (tokenizer.path; or a Hugging Face hub name where online) to count caption "
                   "lengths in tokens, special tokens included; default: words")
    p.add_argument("--max-text-len", type=int, default=None,
                   help="data.max_text_len: also report how many captions are longer (truncated in training)")
    p.add_argument("--kind", choices=("pairs", "images"), default="pairs", help=KIND_HELP)
    p.set_defaults(handler=_stats)
