"""Zero-shot image classification (CLIP's protocol): class names + prompt templates -> text classifier.

Class weight = L2-normalised mean over templates of the L2-normalised text embeddings of
`template.format(classname)`; scores = image embedding x weights (cosine similarities). `class_weights` is
the one implementation: `mmpt-eval`, evaluation during training and `mmpt.load(...).zero_shot` all call it,
so they agree exactly.

Images come from an ImageFolder-style directory (one sub-directory per class, sorted names = class index) or
WebDataset shards whose samples carry an integer `.cls`. Every rank embeds its slice; the per-image
predictions are gathered, so every rank returns the same metrics (no rank-0-only collective).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from mmpt import distributed as mdist
from mmpt.data.shards import expand_urls, split_shards
from mmpt.data.tokenizer import TextTokenizer
from mmpt.data.transforms import EvalTransform, decode_image

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
SHIPPED_TEMPLATES = ("default", "imagenet_openai")  # mmpt/eval/templates/<name>.txt
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # WebDataset entries
TOP_K = (1, 5)


@dataclass
class ZeroShotConfig:
    """`eval.zeroshot`: set `root` (ImageFolder) or `urls` (shards with .cls) to turn it on."""

    root: Optional[str] = None  # one sub-directory per class; sorted names = class index
    urls: Any = None  # WebDataset shards with an image and an integer .cls per sample
    classnames: Optional[str] = None  # line i names class i; required with urls, else the folder names
    templates: str = "default"  # a shipped set (default | imagenet_openai) or a text file, one `{}` template a line
    batch_size: int = 256  # images and prompts per forward pass
    output: Optional[str] = None  # also write the metrics here in clip_benchmark's JSON layout
    name: Optional[str] = None  # the dataset name in that JSON (default: the root folder's name / "wds")


def enabled(cfg: ZeroShotConfig | None) -> bool:
    return cfg is not None and bool(cfg.root or cfg.urls)


# ---- inputs: templates, class names, images -----------------------------------------------------------------

def load_templates(spec: str) -> list[str]:
    """A shipped set name or a file path -> templates (one per non-empty line), each with one `{}`."""
    path = TEMPLATE_DIR / f"{spec}.txt" if spec in SHIPPED_TEMPLATES else Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval.zeroshot.templates={spec!r}: no such file; give one of "
                                f"{', '.join(SHIPPED_TEMPLATES)} or a text file with one `{{}}` template per line")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"eval.zeroshot.templates={spec!r}: every line must hold exactly one `{{}}` (where the class "
                         f"name goes); {'the file is empty' if not templates else f'bad line: {bad[0]!r}'}")
    return templates


def load_classnames(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"eval.zeroshot.classnames={str(path)!r}: no such file; give a text file with one "
                                "class name per line (line i names class i)")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"eval.zeroshot.classnames={str(path)!r} holds no class names")
    return names


def image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class folder names sorted, [(image path, class index)] sorted by path) of an ImageFolder layout."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"eval.zeroshot.root={str(root)!r} is not a directory; give a folder with one "
                                "sub-directory of images per class")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"eval.zeroshot.root={str(root)!r} has no class sub-directories (ImageFolder layout: "
                                "root/<class>/<image>.jpg)")
    samples = [(f, label) for label, name in enumerate(classes) for f in sorted((base / name).rglob("*"))
               if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise FileNotFoundError(f"eval.zeroshot.root={str(root)!r}: no images ({'/'.join(IMAGE_SUFFIXES)}) in its "
                                "class sub-directories")
    return classes, samples


def resolve_classnames(cfg: ZeroShotConfig) -> list[str]:
    """The class names the classifier uses; raises ValueError/FileNotFoundError with the fix."""
    if cfg.root and cfg.urls:
        raise ValueError("eval.zeroshot.root and eval.zeroshot.urls are both set; pick one image source")
    if cfg.root:
        folders, _ = image_folder(cfg.root)
        if not cfg.classnames:
            return folders
        names = load_classnames(cfg.classnames)
        if len(names) != len(folders):
            raise ValueError(f"eval.zeroshot.classnames={cfg.classnames!r} has {len(names)} names but "
                             f"eval.zeroshot.root={cfg.root!r} has {len(folders)} class folders; give one name per "
                             "folder, in sorted folder order")
        return names
    if not cfg.classnames:
        raise ValueError("eval.zeroshot.urls needs eval.zeroshot.classnames (a text file, line i names class i): "
                         "shards carry only integer .cls labels")
    return load_classnames(cfg.classnames)


def check_config(cfg: ZeroShotConfig) -> None:
    """Everything checkable before launch: sources, class names vs folders, templates, batch size."""
    if not enabled(cfg):
        return
    if cfg.batch_size < 1:
        raise ValueError(f"eval.zeroshot.batch_size={cfg.batch_size} must be positive")
    resolve_classnames(cfg)
    load_templates(cfg.templates)
    if cfg.urls:
        from mmpt.data.shards import check_local_shards

        try:
            check_local_shards(cfg.urls)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"eval.zeroshot.urls: {exc}") from None


def read_image(path: str | Path) -> Image.Image:
    """An image file -> RGB PIL, decoded exactly as shard images are (`decode_image`)."""
    return decode_image(Path(path).read_bytes())


@dataclass
class _Labelled:
    pixels: torch.Tensor  # c h w
    label: int


def _folder_images(root: str, transform: EvalTransform, rank: int, world: int,
                   skipped: Counter[str]) -> Iterator[_Labelled]:
    _, samples = image_folder(root)
    for path, label in samples[rank::world]:
        try:
            yield _Labelled(transform(read_image(path)), label)
        except Exception as exn:  # PIL raises many types for a bad file; all mean "skip it"
            if not skipped:
                log.warning("zero-shot: skipping unreadable image %s (%s: %s)", path, type(exn).__name__, exn)
            skipped["bad_image"] += 1


def _shard_images(urls: Any, num_classes: int, transform: EvalTransform, rank: int, world: int,
                  skipped: Counter[str]) -> Iterator[_Labelled]:
    from webdataset.tariterators import tarfile_samples

    def on_error(exn: Exception) -> bool:
        skipped["bad_tar"] += 1
        log.warning("zero-shot: unreadable tar data (%r)", exn)
        return True

    mine = split_shards(expand_urls(urls), rank, world, 0, 1)
    for raw in tarfile_samples(({"url": u} for u in mine), handler=on_error):
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        try:
            label = int(raw["cls"].decode().strip()) if raw.get("cls") is not None else -1
        except ValueError:
            label = -1
        if ext is None or not 0 <= label < num_classes:
            skipped["missing_image" if ext is None else "bad_cls"] += 1
            continue
        try:
            yield _Labelled(transform(decode_image(raw[ext])), label)
        except Exception:  # a corrupt image
            skipped["bad_image"] += 1


# ---- the classifier -------------------------------------------------------------------------------------------

def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def class_weights(model: Any, tokenizer: TextTokenizer, classnames: Sequence[str], templates: Sequence[str],
                  device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """`e k` fp32: column c = L2-normalised mean over templates of the (L2-normalised) text embeddings of
    `template.format(classnames[c])`. Prompts are encoded flat, class-major, in chunks of `batch_size`."""
    prompts = [t.format(name) for name in classnames for t in templates]
    ids, mask = tokenizer(prompts)  # (k t) l
    feats = []
    for part in _chunks(len(prompts), batch_size):
        emb = model.encode_text(ids[part].to(device), mask[part].to(device)).float()
        feats.append(torch.nn.functional.normalize(emb, dim=-1))  # models already normalise: a no-op guard
    per_prompt = torch.cat(feats).reshape(len(classnames), len(templates), -1)  # k t e
    weights = torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)  # k e
    return weights.T.contiguous()  # e k


@torch.no_grad()
def encode_images(model: Any, pixels: torch.Tensor, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None, batch_size: int = 256) -> torch.Tensor:
    """`b c h w` (already preprocessed) -> `b e` fp32 image embeddings, in chunks of `batch_size`."""
    out = [model.encode_image(pixels[part].to(device, dtype)).float().cpu() for part in _chunks(len(pixels), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def scores(image_embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`b e` x `e k` -> `b k` cosine similarities (argmax = predicted class)."""
    return image_embeddings.float() @ weights.to(image_embeddings.device).float()


def classification_metrics(topk: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """topk `n K` (classes by descending score), labels `n` -> top-1, top-5 (k capped at the class count) and
    mean per-class recall (over the classes that have images; = sklearn's balanced accuracy)."""
    n = len(labels)
    out: dict[str, float] = {}
    for k in TOP_K:
        hits = (topk[:, : min(k, num_classes)] == labels[:, None]).any(axis=1) if n else np.zeros(0, bool)
        out[f"zeroshot/top{k}"] = float(hits.mean()) if n else 0.0
    correct = topk[:, 0] == labels if n else np.zeros(0, bool)
    present = np.unique(labels)
    recalls = [correct[labels == c].mean() for c in present]
    out["zeroshot/mean_per_class_recall"] = float(np.mean(recalls)) if recalls else 0.0
    out["zeroshot/num_images"] = float(n)
    return out


@dataclass
class ZeroShotResult:
    metrics: dict[str, float]
    classnames: list[str] = field(default_factory=list)


@torch.no_grad()
def zeroshot_eval(model: Any, tokenizer: TextTokenizer, cfg: ZeroShotConfig, image_size: int,
                  mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> ZeroShotResult:
    """Collective: every rank must call it. Each rank classifies its slice of the images; the top-k
    predictions and labels are all-gathered, so every rank returns the same metrics."""
    classnames = resolve_classnames(cfg)
    templates = load_templates(cfg.templates)
    transform = EvalTransform(image_size, mean=mean, std=std)
    was_training = model.training
    model.eval()
    weights = class_weights(model, tokenizer, classnames, templates, device, cfg.batch_size)
    rank, world = mdist.rank(), mdist.world_size()
    skipped: Counter[str] = Counter()
    if cfg.root:
        items = _folder_images(cfg.root, transform, rank, world, skipped)
    else:
        items = _shard_images(cfg.urls, len(classnames), transform, rank, world, skipped)
    k = min(max(TOP_K), len(classnames))
    topk, labels, buf = [], [], []

    def flush() -> None:
        pixels = torch.stack([it.pixels for it in buf])
        emb = encode_images(model, pixels, device, dtype, cfg.batch_size)
        topk.append(scores(emb, weights.cpu()).topk(k, dim=-1).indices.numpy())
        labels.append(np.array([it.label for it in buf], dtype=np.int64))
        buf.clear()

    for item in items:
        buf.append(item)
        if len(buf) == cfg.batch_size:
            flush()
    if buf:
        flush()
    model.train(was_training)
    local = (np.concatenate(topk) if topk else np.zeros((0, k), np.int64),
             np.concatenate(labels) if labels else np.zeros(0, np.int64), dict(skipped))
    parts = mdist.all_gather_objects(local)
    all_topk = np.concatenate([p[0] for p in parts])  # type: ignore[index]
    all_labels = np.concatenate([p[1] for p in parts])  # type: ignore[index]
    if not len(all_labels):
        raise RuntimeError(f"zero-shot: no usable images in {cfg.root or cfg.urls} on any rank")
    metrics = classification_metrics(all_topk, all_labels, len(classnames))
    total_skipped = sum(sum(p[2].values()) for p in parts)  # type: ignore[index]
    if total_skipped:
        metrics["zeroshot/skipped"] = float(total_skipped)
    return ZeroShotResult(metrics, classnames)


def clip_benchmark_record(metrics: dict[str, float], dataset: str, model: str, pretrained: str) -> dict[str, Any]:
    """The JSON layout clip_benchmark writes for `--task zeroshot_classification`."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": "zeroshot_classification",
        "metrics": {"acc1": metrics["zeroshot/top1"], "acc5": metrics["zeroshot/top5"],
                    "mean_per_class_recall": metrics["zeroshot/mean_per_class_recall"]},
        "language": "en",
    }


def dataset_name(cfg: ZeroShotConfig) -> str:
    if cfg.name:
        return cfg.name
    return Path(cfg.root).expanduser().resolve().name if cfg.root else "wds"


def write_clip_benchmark_json(cfg: ZeroShotConfig, metrics: dict[str, float], model: str, pretrained: str) -> Path:
    path = Path(cfg.output).expanduser()  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    record = clip_benchmark_record(metrics, dataset_name(cfg), model, pretrained)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
