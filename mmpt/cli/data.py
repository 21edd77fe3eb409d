"""`mmpt-data`: make data for mmpt (synthetic shards, a WordPiece tokenizer).

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

USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input: reported as `error: <message>` with exit code 2."""


def _synthetic(args: argparse.Namespace) -> int:
    from mmpt.data.synthetic import SyntheticConfigError, brace_pattern, write_shards

    start = time.perf_counter()
    try:
        sizes = write_shards(
            args.out, num_samples=args.num_samples, shard_size=args.shard_size, seed=args.seed,
            image_size=args.image_size, start_index=args.start_index, prefix=args.prefix,
            p_two=args.p_two, jpeg_quality=args.jpeg_quality, progress=True,
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
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar (<= 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--start-index", type=int, default=0,
                   help="first global sample index (a multiple of --shard-size); use disjoint ranges for held-out sets")
    p.add_argument("--prefix", default="", help="prefix for shard file names and sample keys")
    p.add_argument("--p-two", type=float, default=0.7, help="fraction of scenes with two shapes")
    p.add_argument("--jpeg-quality", type=int, default=90, choices=range(1, 101), metavar="[1-100]")
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
    p.add_argument("--vocab-size", type=int, default=1000)
    p.set_defaults(handler=_tokenizer)


SUBCOMMANDS: dict[str, Callable] = {"synthetic": add_synthetic, "tokenizer": add_tokenizer}


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
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
