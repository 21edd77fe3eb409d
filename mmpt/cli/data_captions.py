"""`mmpt-data from-coco` and `mmpt-data from-csv`: caption datasets on disk -> mmpt eval/train shards.

Kept apart from mmpt/cli/data.py (which lists these subcommands) so each file stays about one thing.
User errors are raised as CaptionSourceError; mmpt-data's main prints them as one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from mmpt.data.caption_sources import KARPATHY_SPLITS, CaptionSource, CaptionSourceError, csv_delimiter
from mmpt.data.shard_writer import MAX_SHARD_SIZE

SPLIT_HELP = (
    "Karpathy split file (dataset_coco.json, dataset_flickr30k.json): which images to convert, required. "
    "train = train + restval (the Karpathy train set ALBEF/BLIP/open_clip train on: 113,287 COCO images; "
    "Flickr30k has no restval); train-only = only the images marked train; restval; val; test (5,000 COCO / "
    "1,000 Flickr30k images: the retrieval benchmark); all = every image. A COCO captions json "
    "(captions_val2017.json) has no split field, so nothing is filtered: there --split train/val/test only "
    "names the file's split to pick the default --layout, and the other values are refused."
)
LAYOUT_HELP = (
    "eval: one sample per image, .txt = first caption, .json = {image_id, captions: [all]} (for data.eval.urls "
    "and the standard retrieval protocol); train: one sample per (image, caption) pair, .json = {image_id}"
)


def _common_output_args(p: argparse.ArgumentParser, layout_default: str) -> None:
    p.add_argument("--out", required=True, help="output directory for {00000..N}.tar, sizes.json, report.json "
                   "(created if missing; must not already hold shards unless --overwrite)")
    p.add_argument("--layout", choices=("eval", "train"), default=None,
                   help=f"{LAYOUT_HELP}. Default: {layout_default}")
    p.add_argument("--shard-size", type=int, default=1000, help=f"samples per tar, 1..{MAX_SHARD_SIZE} (default 1000)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode and check the images (default: min(8, CPUs))")
    p.add_argument("--shorter-side", type=int, default=None,
                   help="downscale images whose shorter side is longer than N pixels to N (aspect kept, re-encoded "
                   "as JPEG) to save disk; keep N >= data.image_size. Default: the original JPEG bytes, unchanged")
    p.add_argument("--max-images", type=int, default=None,
                   help="convert only the first N images (in file order), e.g. for a quick trial")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards, sizes.json and report.json already in --out")


def _check_numbers(args: argparse.Namespace) -> None:
    if not 1 <= args.shard_size <= MAX_SHARD_SIZE:
        raise CaptionSourceError(f"--shard-size must be in [1, {MAX_SHARD_SIZE}], got {args.shard_size}")
    if args.workers < 1:
        raise CaptionSourceError(f"--workers must be >= 1, got {args.workers}")
    if args.shorter_side is not None and args.shorter_side < 1:
        raise CaptionSourceError(f"--shorter-side must be >= 1, got {args.shorter_side}")
    if args.max_images is not None and args.max_images < 1:
        raise CaptionSourceError(f"--max-images must be >= 1, got {args.max_images}")


def _convert(source: CaptionSource, args: argparse.Namespace, layout: str, unit: str, **context: object) -> int:
    """Write the shards and the report, then print what was written, what was skipped, and the url pattern."""
    from mmpt.data.caption_shards import prepare_out_dir, write_caption_shards, write_report
    from mmpt.data.shard_writer import brace_pattern

    if args.max_images is not None:
        source.images = source.images[: args.max_images]
    if not source.images:  # before the output folder or a progress bar exists
        raise CaptionSourceError(_no_samples(source.skipped_images, source.skipped_captions, source.examples, unit))
    try:
        out = prepare_out_dir(args.out, args.overwrite)
    except OSError as exc:  # FileExistsError included: --out already holds shards
        raise CaptionSourceError(str(exc)) from exc
    start = time.perf_counter()
    result = write_caption_shards(source, out, layout, args.shard_size, workers=args.workers,
                                  shorter_side=args.shorter_side)
    seconds = time.perf_counter() - start
    report = write_report(out, result, layout=layout, shorter_side=args.shorter_side, **context)
    if not result.sizes:
        message = _no_samples(result.skipped_images, result.skipped_captions, result.examples, unit)
        raise CaptionSourceError(f"{message} (details in {report})")
    skipped = _skipped_line(result.skipped_images, result.skipped_captions, unit)
    n_shards = len(result.sizes)
    print(f"wrote {result.samples} {layout} samples ({result.images} images, {result.captions} captions) in "
          f"{n_shards} shard{'s' * (n_shards != 1)} to {out} in {seconds:.1f}s")
    print(f"skipped: {skipped} (details: {report})")
    key = "data.eval.urls" if layout == "eval" else "data.train.urls"
    print(f"use: {url_override(key, brace_pattern(out.resolve(), list(result.sizes)))}")
    return 0


def url_override(key: str, pattern: str) -> str:
    """`"key='pattern'"`: the inner quotes keep Hydra from parsing the braces, the outer ones keep bash from
    expanding them, so the line works pasted after mmpt-train or mmpt-eval."""
    override = f"{key}='{pattern}'"
    return f'"{override}"' if not any(c in pattern for c in "'\"$`\\!") else shlex.quote(override)


def _no_samples(images: dict[str, int], captions: dict[str, int], examples: dict[str, str], unit: str) -> str:
    first = "; ".join(f"{reason}: {example}" for reason, example in sorted(examples.items())[:3])
    return (f"no usable samples: {_skipped_line(images, captions, unit)}; first of each: {first}. "
            "Check --images / --image-root, the columns and --split")


def _skipped_line(images: dict[str, int], captions: dict[str, int], unit: str) -> str:
    """'missing_file 1 image (5 captions), empty_caption 2 captions' or 'nothing'."""
    parts = []
    for reason in sorted(set(images) | set(captions)):
        n_img, n_cap = images.get(reason, 0), captions.get(reason, 0)
        cap = f"{n_cap} {unit}{'s' * (n_cap != 1)}"
        parts.append(f"{reason} {n_img} image{'s' * (n_img != 1)} ({cap})" if n_img else f"{reason} {cap}")
    return ", ".join(parts) or "nothing"


def _from_coco(args: argparse.Namespace) -> int:
    from mmpt.data.caption_shards import default_layout
    from mmpt.data.caption_sources import read_annotations

    _check_numbers(args)
    source = read_annotations(args.annotations, args.images, args.split)
    layout = args.layout or default_layout(args.split)
    return _convert(source, args, layout, "caption", command="from-coco", format=source.format,
                    split=args.split, annotations=str(args.annotations), images_dir=str(args.images))


def add_from_coco(subparsers) -> None:
    p = subparsers.add_parser(
        "from-coco", help="COCO captions / Karpathy split json + image folder -> eval or train shards",
        description="Convert a COCO captions json (images[] + annotations[]) or a Karpathy split json "
        "(dataset_coco.json / dataset_flickr30k.json; the layout is detected) and its images into WebDataset "
        "shards. Images that are missing or do not decode, and empty captions, are skipped and counted "
        "(report.json). Example: mmpt-data from-coco --annotations dataset_coco.json --images coco/ "
        "--split test --out coco_test/",
    )
    p.add_argument("--annotations", required=True, help="COCO captions json or Karpathy split json")
    p.add_argument("--images", required=True,
                   help="image folder: COCO captions json: the folder of its file_name entries (e.g. val2017/); "
                   "Karpathy: the folder holding filepath/filename (COCO: the one with train2014/ and val2014/), "
                   "or the folder of the files themselves (Flickr30k: flickr30k-images/)")
    p.add_argument("--split", choices=list(KARPATHY_SPLITS), default=None, help=SPLIT_HELP)
    _common_output_args(p, "eval for --split val or test, train otherwise")
    p.set_defaults(handler=_from_coco)


def _img2dataset_hint(args: argparse.Namespace, source: CaptionSource) -> str:
    """A command that downloads the CSV's URL rows into shards mmpt reads."""
    path = Path(args.file)
    fmt = "tsv" if csv_delimiter(path, args.delimiter) == "\t" else "csv"
    command = ["img2dataset", "--url_list", str(path), "--input_format", fmt, "--url_col", args.image_col,
               "--caption_col", args.caption_col, "--output_format", "webdataset",
               "--output_folder", f"{str(args.out).rstrip('/')}-img2dataset", "--image_size", "256",
               "--resize_mode", "keep_ratio"]
    note = ""
    if args.image_id_col:
        command += ["--save_additional_columns", f'["{args.image_id_col}"]']
        if args.image_id_col != "image_id":
            note = (" (mmpt reads the image id from the .json key 'image_id': name the column image_id, "
                    "or captions of one image count as different images)")
    return (f"{source.url_rows} row(s) name http(s) URLs and were not downloaded; fetch them with img2dataset "
            f"(pip install img2dataset):\n  {shlex.join(command)}{note}")


def _from_csv(args: argparse.Namespace) -> int:
    from mmpt.data.caption_sources import read_csv

    _check_numbers(args)
    source = read_csv(args.file, args.image_col, args.caption_col, args.image_root, args.image_id_col,
                      args.delimiter)
    layout = args.layout or "train"
    if source.url_rows and not source.images:
        print(_img2dataset_hint(args, source))
    code = _convert(source, args, layout, "row", command="from-csv", format="csv", csv=str(args.file),
                    url_rows=source.url_rows)
    if source.url_rows:
        print(_img2dataset_hint(args, source))
    return code


def add_from_csv(subparsers) -> None:
    p = subparsers.add_parser(
        "from-csv", help="CSV/TSV of local image paths + captions -> train or eval shards",
        description="Convert a CSV (or TSV) with a header row, one (image path, caption) per row, into WebDataset "
        "shards. Rows of the same image (same --image-id-col value, else same path) form one image. Rows "
        "whose image is an http(s) URL are counted and not downloaded: the command prints the img2dataset "
        "call for them. Missing or undecodable images, empty captions and short rows are skipped and counted.",
    )
    p.add_argument("file", help="the CSV/TSV file (UTF-8, header row)")
    p.add_argument("--image-col", required=True, help="column with the image path (relative to --image-root)")
    p.add_argument("--caption-col", required=True, help="column with the caption")
    p.add_argument("--image-id-col", default=None,
                   help="column with an image id (groups rows of one image; default: the image path as written)")
    p.add_argument("--image-root", default=None, help="folder relative image paths start from (default: the CSV's)")
    p.add_argument("--delimiter", default=None,
                   help="field separator (default: tab for .tsv, else comma; 'tab' or '\\t' for a tab)")
    _common_output_args(p, "train")
    p.set_defaults(handler=_from_csv)
