"""Caption datasets as they ship (COCO captions json, Karpathy split json, a CSV of local paths) -> one
list of images with all their captions.

Why one shape for all: the shard writer (mmpt.data.caption_shards) then has a single job, and every source
gets the same bad-row accounting. Nothing here reads an image: that happens (in parallel) while writing.
Rows that cannot become a sample are dropped here and counted by reason, never silently.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --split values for Karpathy files -> the `split` labels they select. "train" is what ALBEF, BLIP and
# open_clip call the Karpathy train set: train + restval (113,287 COCO images; Flickr30k has no restval).
KARPATHY_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train", "restval"),
    "train-only": ("train",),
    "restval": ("restval",),
    "val": ("val",),
    "test": ("test",),
    "all": ("train", "restval", "val", "test"),
}
# A COCO captions file has no split field: --split only names it (and so picks the default layout).
COCO_SPLIT_NAMES = ("train", "val", "test")
URL_SCHEMES = ("http://", "https://")


class CaptionSourceError(ValueError):
    """Input that cannot be converted at all (a user error: the CLI prints it as one `error:` line)."""


@dataclass(frozen=True)
class CaptionedImage:
    """One image and its captions, in the source's order (the first caption is the eval `.txt`)."""

    image_id: str
    path: Path
    captions: tuple[str, ...]


@dataclass
class CaptionSource:
    """What a reader found. `skipped_images` counts images and `skipped_captions` counts captions (input
    rows: annotations, sentences, CSV rows) dropped by reason; an image dropped with its captions counts in both.
    """

    format: str  # "coco" | "karpathy" | "csv"
    images: list[CaptionedImage]
    skipped_images: Counter[str] = field(default_factory=Counter)
    skipped_captions: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first offending row, for the report
    url_rows: int = 0  # CSV rows whose image is an http(s) URL (not downloaded)

    def skip(self, reason: str, example: str, images: int = 0, captions: int = 0) -> None:
        if images:
            self.skipped_images[reason] += images
        if captions:
            self.skipped_captions[reason] += captions
        self.examples.setdefault(reason, example)


def load_json(path: str | os.PathLike) -> Any:
    """The parsed file, or a CaptionSourceError that says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CaptionSourceError(f"annotations file not found: {path}; give the path to a COCO captions json "
                                 "(captions_val2017.json) or a Karpathy split json (dataset_coco.json)")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CaptionSourceError(f"{path} is not valid JSON ({exc}); expected a COCO captions json or a "
                                 "Karpathy split json") from exc
    except OSError as exc:
        raise CaptionSourceError(f"cannot read {path}: {exc}") from exc


def detect_layout(data: Any, path: str | os.PathLike) -> str:
    """"coco" (images[] + annotations[] with captions) or "karpathy" (images[] with sentences[] and split)."""
    expected = ("expected a COCO captions json (images[] with id, file_name; annotations[] with image_id, "
                "caption) or a Karpathy split json (images[] with filename, split, sentences[].raw)")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CaptionSourceError(f"{path}: no images[] list, so no known layout; {expected}")
    annotations = data.get("annotations")
    if isinstance(annotations, list):
        if annotations and isinstance(annotations[0], dict) and "caption" not in annotations[0]:
            raise CaptionSourceError(
                f"{path}: annotations[] have no 'caption' field (an instances or keypoints file?); "
                "use the captions file, e.g. annotations/captions_val2017.json")
        return "coco"
    first = images[0] if images else None
    if isinstance(first, dict) and "sentences" in first and "split" in first:
        return "karpathy"
    raise CaptionSourceError(f"{path}: no annotations[] and images[] without sentences/split: no known layout; "
                             f"{expected}")


def _check_images_dir(images_dir: str | os.PathLike) -> Path:
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise CaptionSourceError(f"--images {root} is not a directory; give the folder that holds the image files")
    return root


def read_coco_captions(data: dict, images_dir: str | os.PathLike) -> CaptionSource:
    """COCO captions json: images[] (id, file_name under `images_dir`) and annotations[] (image_id, caption)."""
    root = _check_images_dir(images_dir)
    source = CaptionSource("coco", [])
    files: dict[str, str] = {}
    for entry in data["images"]:
        image_id = entry.get("id") if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if image_id is None or not file_name:
            source.skip("missing_field", f"images[] entry without id/file_name: {str(entry)[:200]}", images=1)
            continue
        files.setdefault(str(image_id), str(file_name))
    captions: dict[str, list[str]] = {image_id: [] for image_id in files}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or ann.get("image_id") is None:
            source.skip("missing_field", f"annotations[] entry without image_id: {str(ann)[:200]}", captions=1)
            continue
        image_id = str(ann["image_id"])
        text = str(ann.get("caption") or "").strip()
        if image_id not in captions:
            source.skip("unknown_image_id", f"annotation {ann.get('id')} names image_id {image_id}", captions=1)
        elif not text:
            source.skip("empty_caption", f"annotation {ann.get('id')} of image {image_id}", captions=1)
        else:
            captions[image_id].append(text)
    for image_id, file_name in files.items():
        if captions[image_id]:
            source.images.append(CaptionedImage(image_id, root / file_name, tuple(captions[image_id])))
        else:
            source.skip("no_captions", f"image {image_id} ({file_name})", images=1)
    return source


def _karpathy_path(root: Path, entry: dict) -> Path:
    """DIR/filepath/filename (COCO: DIR holds train2014/, val2014/); else DIR/filename, so --images may also
    point straight at the folder of the files (Flickr30k's flickr30k-images/, or one COCO folder)."""
    nested = root / str(entry.get("filepath") or "") / str(entry["filename"])
    if nested.is_file():
        return nested
    flat = root / str(entry["filename"])
    return flat if flat.is_file() else nested


def karpathy_split_counts(data: dict) -> dict[str, int]:
    return dict(Counter(str(e.get("split")) for e in data["images"] if isinstance(e, dict)))


def read_karpathy(data: dict, images_dir: str | os.PathLike, split: str | None,
                  path: str | os.PathLike = "") -> CaptionSource:
    """Karpathy split json (dataset_coco.json / dataset_flickr30k.json): the images of `split` (a key of
    KARPATHY_SPLITS). image_id is `cocoid` where present (COCO's own image id), else `imgid`."""
    counts = ", ".join(f"{name} {n}" for name, n in sorted(karpathy_split_counts(data).items()))
    if split is None:
        raise CaptionSourceError(f"{path} is a Karpathy split file ({counts}): choose the images with "
                                 f"--split {{{','.join(KARPATHY_SPLITS)}}} (train = train + restval)")
    if split not in KARPATHY_SPLITS:
        raise CaptionSourceError(f"--split {split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
    root = _check_images_dir(images_dir)
    wanted = KARPATHY_SPLITS[split]
    source = CaptionSource("karpathy", [])
    for entry in data["images"]:
        if not isinstance(entry, dict) or entry.get("split") not in wanted:
            continue
        image_id = entry.get("cocoid", entry.get("imgid"))
        sentences = entry.get("sentences") or []
        if image_id is None or not entry.get("filename"):
            source.skip("missing_field", f"images[] entry without imgid/cocoid/filename: {str(entry)[:200]}",
                        images=1, captions=len(sentences))
            continue
        captions = []
        for sentence in sentences:
            text = str(sentence.get("raw") or "").strip() if isinstance(sentence, dict) else ""
            if text:
                captions.append(text)
            else:
                source.skip("empty_caption", f"image {image_id} ({entry['filename']})", captions=1)
        if captions:
            source.images.append(CaptionedImage(str(image_id), _karpathy_path(root, entry), tuple(captions)))
        else:
            source.skip("no_captions", f"image {image_id} ({entry['filename']})", images=1)
    if not source.images and not source.skipped_images:
        raise CaptionSourceError(f"--split {split} selects no images in {path} ({counts})")
    return source


def read_annotations(annotations: str | os.PathLike, images_dir: str | os.PathLike,
                     split: str | None) -> CaptionSource:
    """Detect the layout of `annotations` and read it (see the CLI's `from-coco --help` for --split)."""
    data = load_json(annotations)
    layout = detect_layout(data, annotations)
    if layout == "karpathy":
        return read_karpathy(data, images_dir, split, annotations)
    if split is not None and split not in COCO_SPLIT_NAMES:
        raise CaptionSourceError(
            f"--split {split} needs a Karpathy split file; {annotations} is a COCO captions json, which has no "
            f"split field (it is one split): leave --split out or give {'/'.join(COCO_SPLIT_NAMES)} to name it")
    return read_coco_captions(data, images_dir)


def csv_delimiter(path: str | os.PathLike, delimiter: str | None) -> str:
    """`delimiter` as given ('tab' and '\\t' mean a tab), else tab for .tsv files and comma otherwise."""
    if delimiter:
        return "\t" if delimiter in ("\\t", "tab") else delimiter
    return "\t" if Path(path).suffix.lower() == ".tsv" else ","


def read_csv(path: str | os.PathLike, image_col: str, caption_col: str, image_root: str | os.PathLike | None = None,
             image_id_col: str | None = None, delimiter: str | None = None) -> CaptionSource:
    """A CSV/TSV of (image path, caption) rows. Relative paths are taken from `image_root`, else from the CSV's
    folder. Rows of one image (same `image_id_col` value, else the same path) are grouped, in first-seen order;
    image_id is that value (else the path as written in the CSV). http(s) rows are counted, not downloaded."""
    path = Path(path)
    if not path.is_file():
        raise CaptionSourceError(f"CSV file not found: {path}")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    if image_root is not None and not root.is_dir():
        raise CaptionSourceError(f"--image-root {root} is not a directory")
    source = CaptionSource("csv", [])
    groups: dict[str, tuple[str, Path, list[str]]] = {}  # group key -> (image_id, path, captions)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=csv_delimiter(path, delimiter))
            header = reader.fieldnames
            if not header:
                raise CaptionSourceError(f"{path} is empty: expected a header row naming the columns")
            for flag, column in (("--image-col", image_col), ("--caption-col", caption_col),
                                 ("--image-id-col", image_id_col)):
                if column is not None and column not in header:
                    raise CaptionSourceError(
                        f"{flag} {column!r} is not a column of {path}; its columns are: "
                        f"{', '.join(repr(c) for c in header)} (pass --delimiter if they look merged)")
            for line, row in enumerate(reader, start=2):
                _add_csv_row(source, groups, row, f"{path}:{line}", root, image_col, caption_col, image_id_col)
    except UnicodeDecodeError as exc:
        raise CaptionSourceError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    except csv.Error as exc:
        raise CaptionSourceError(f"{path}: not a readable CSV ({exc})") from exc
    source.images = [CaptionedImage(image_id, image_path, tuple(captions))
                     for image_id, image_path, captions in groups.values()]
    return source


def _add_csv_row(source: CaptionSource, groups: dict[str, tuple[str, Path, list[str]]], row: dict, where: str,
                 root: Path, image_col: str, caption_col: str, image_id_col: str | None) -> None:
    image = row.get(image_col)
    caption = row.get(caption_col)
    image_id = row.get(image_id_col) if image_id_col else image
    if image is None or caption is None or image_id is None:  # a short row: the column has no cell
        source.skip("missing_field", where, captions=1)
        return
    image, caption, image_id = image.strip(), caption.strip(), image_id.strip()
    if not image or not image_id:
        source.skip("missing_field", where, captions=1)
    elif image.lower().startswith(URL_SCHEMES):
        source.url_rows += 1
        source.skip("url_not_downloaded", where, captions=1)
    elif not caption:
        source.skip("empty_caption", where, captions=1)
    else:
        image_path = Path(image).expanduser()
        image_path = image_path if image_path.is_absolute() else root / image_path
        groups.setdefault(image_id if image_id_col else str(image_path), (image_id, image_path, []))[2].append(caption)
