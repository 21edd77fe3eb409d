"""`mmpt-data from-coco` / `from-csv`: COCO captions json, Karpathy split json and CSV -> eval/train shards.

Real files only: PIL-made JPEG/PNG images, a corrupt one and a missing one, the json layouts as the datasets
ship them; shards are read back with tarfile and with mmpt's own eval loader.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mmpt.cli.data import main
from mmpt.data.pipeline import build_eval_loader
from mmpt.data.tokenizer import TextTokenizer, train_wordpiece

# image id -> (file name, format, colour, size); "corrupt" and "missing" are bad on purpose
GOOD = {
    11: ("a.jpg", "JPEG", (200, 30, 30), (40, 30)),
    12: ("b.png", "PNG", (20, 40, 220), (32, 32)),
    13: ("c.jpg", "JPEG", (30, 180, 40), (36, 48)),
}
CORRUPT, MISSING, NO_CAPTIONS = 14, 15, 16
FILES = {**{i: v[0] for i, v in GOOD.items()}, CORRUPT: "corrupt.jpg", MISSING: "missing.jpg", NO_CAPTIONS: "d.jpg"}


def captions_of(image_id: int) -> list[str]:
    return [f"photo {image_id} caption {j}" for j in range(5)]


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, fmt, colour, size in GOOD.values():
        Image.new("RGB", size, colour).save(folder / name, format=fmt)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / FILES[NO_CAPTIONS], format="JPEG")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(jpeg, format="JPEG")
    (folder / FILES[CORRUPT]).write_bytes(jpeg.getvalue()[:200])  # truncated: the header parses, the decode fails


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every tar in `out`, via tarfile (independent of mmpt's reader)."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def decoded(jpg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpg))
    img.load()
    return img


@pytest.fixture
def coco(tmp_path) -> tuple[Path, Path]:
    """(captions json, image folder): 5 captions per image, one extra empty caption, one unknown image id,
    an image without captions, a corrupt image and a missing one."""
    images = tmp_path / "val2017"
    make_images(images)
    ids = [*GOOD, CORRUPT, MISSING, NO_CAPTIONS]
    annotations = [{"id": 100 * i + j, "image_id": i, "caption": c + (" \n" if j == 0 else "")}
                   for i in ids if i != NO_CAPTIONS for j, c in enumerate(captions_of(i))]
    annotations.insert(3, {"id": 1, "image_id": 11, "caption": "   "})
    annotations.append({"id": 2, "image_id": 999, "caption": "of an image that is not listed"})
    data = {"info": {}, "images": [{"id": i, "file_name": FILES[i], "height": 1, "width": 1} for i in ids],
            "annotations": annotations}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    return path, images


KARPATHY_SPLIT = {11: "test", 12: "val", 13: "restval", CORRUPT: "train", MISSING: "test", NO_CAPTIONS: "train"}


@pytest.fixture
def karpathy(tmp_path) -> tuple[Path, Path]:
    """dataset_coco.json layout: images under root/val2014/ (filepath), `cocoid` ids, `imgid` indices."""
    root = tmp_path / "coco"
    make_images(root / "val2014")
    entries = []
    for n, (i, split) in enumerate(KARPATHY_SPLIT.items()):
        sentences = [{"raw": c, "tokens": c.split(), "imgid": n, "sentid": 5 * n + j}
                     for j, c in enumerate(captions_of(i))]
        entries.append({"filepath": "val2014", "filename": FILES[i], "imgid": n, "split": split,
                        "sentences": sentences, "cocoid": i, "sentids": [s["sentid"] for s in sentences]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, root


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def coco_argv(coco, out: Path, *extra: str) -> list[str]:
    return ["from-coco", "--annotations", str(coco[0]), "--images", str(coco[1]), "--out", str(out),
            "--workers", "1", *extra]


# ---------------------------------------------------------------- COCO captions json


def test_coco_eval_layout_one_sample_per_image(coco, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = run(coco_argv(coco, out, "--layout", "eval"), capsys)
    assert code == 0, err
    samples = read_shards(out)
    assert sorted(samples) == ["000000000", "000000001", "000000002"]  # file order, img2dataset-style keys
    by_id = {json.loads(s["json"])["image_id"]: s for s in samples.values()}
    assert set(by_id) == {"11", "12", "13"}
    for image_id, (name, fmt, colour, size) in GOOD.items():
        sample = by_id[str(image_id)]
        assert set(sample) == {"jpg", "txt", "json"}
        assert json.loads(sample["json"]) == {"image_id": str(image_id), "captions": captions_of(image_id)}
        assert sample["txt"].decode() == captions_of(image_id)[0]  # stripped, empty caption dropped
        img = decoded(sample["jpg"])
        assert img.format == "JPEG" and img.size == size
        assert max(abs(a - b) for a, b in zip(img.convert("RGB").getpixel((5, 5)), colour)) <= 8
        if fmt == "JPEG":
            assert sample["jpg"] == (coco[1] / name).read_bytes()  # original bytes kept
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3}
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_images"] == {"bad_image": 1, "missing_file": 1, "no_captions": 1}
    assert report["skipped_captions"] == {"bad_image": 5, "missing_file": 5, "empty_caption": 1, "unknown_image_id": 1}
    assert (report["samples"], report["images"], report["captions"], report["layout"]) == (3, 3, 15, "eval")
    assert report["format"] == "coco" and "missing.jpg" in report["examples"]["missing_file"]
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("wrote 3 eval samples (3 images, 15 captions) in 1 shard to")
    assert "bad_image 1 image (5 captions)" in lines[1] and "empty_caption 1 caption" in lines[1]
    assert lines[-1] == f"use: \"data.eval.urls='{out}/00000.tar'\""


def test_coco_train_layout_one_sample_per_pair_across_shards(coco, tmp_path, capsys):
    out = tmp_path / "train"
    code, stdout, _ = run(coco_argv(coco, out, "--shard-size", "4"), capsys)  # no --split: train layout
    assert code == 0
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 4,
                                                            "00003.tar": 3}
    samples = read_shards(out)
    assert list(samples)[:5] == ["000000000", "000000001", "000000002", "000000003", "000010000"]
    pairs = [(json.loads(s["json"]), s["txt"].decode()) for s in samples.values()]
    assert all(set(meta) == {"image_id"} for meta, _ in pairs)
    assert sorted((m["image_id"], c) for m, c in pairs) == sorted(
        (str(i), c) for i in GOOD for c in captions_of(i))
    assert stdout.strip().splitlines()[-1] == f"use: \"data.train.urls='{out}/{{00000..00003}}.tar'\""
    # stable: converting again gives byte-identical shards
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert run(coco_argv(coco, out, "--shard-size", "4", "--overwrite"), capsys)[0] == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first


def test_coco_split_name_picks_layout_and_options_apply(coco, tmp_path, capsys):
    """--split val on a COCO captions json filters nothing but defaults to the eval layout; --max-images keeps
    the first images; --shorter-side downscales (aspect kept) and re-encodes."""
    out = tmp_path / "o"
    code, stdout, err = run(coco_argv(coco, out, "--split", "val", "--max-images", "2", "--shorter-side", "20"), capsys)
    assert code == 0, err
    metas, sizes = [], []
    for sample in read_shards(out).values():
        metas.append(json.loads(sample["json"]))
        img = decoded(sample["jpg"])
        assert img.format == "JPEG"
        sizes.append(img.size)
    assert [m["image_id"] for m in metas] == ["11", "12"] and all("captions" in m for m in metas)
    assert sizes == [(27, 20), (20, 20)]  # 40x30 -> shorter side 20; 32x32 -> 20x20
    report = json.loads((out / "report.json").read_text())
    assert (report["layout"], report["split"], report["shorter_side"]) == ("eval", "val", 20)


def test_existing_shards_need_overwrite(coco, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(coco_argv(coco, out, "--shard-size", "2"), capsys)[0] == 0
    assert len(list(out.glob("*.tar"))) == 8
    code, _, err = run(coco_argv(coco, out), capsys)
    assert code == 2 and err.startswith("error: --out") and "--overwrite" in err
    assert run(coco_argv(coco, out, "--overwrite"), capsys)[0] == 0  # one shard now: the 7 stale ones are gone
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 15}


@pytest.mark.parametrize("layout", ["train", "eval"])
def test_mmpt_eval_loader_reads_the_shards(coco, tmp_path, capsys, layout):
    """mmpt's own loader: image ids come from the .json; captions from the .txt (train) or the json's list (eval)."""
    out = tmp_path / layout
    assert run(coco_argv(coco, out, "--shard-size", "6", "--layout", layout), capsys)[0] == 0
    all_captions = [c for i in GOOD for c in captions_of(i)]
    tokenizer = TextTokenizer(train_wordpiece(all_captions, vocab_size=100), max_len=16)
    loader = build_eval_loader(f"{out}/{{00000..0000{len(list(out.glob('*.tar'))) - 1}}}.tar", tokenizer,
                               batch_size=4, image_size=32, num_workers=0, rank=0, world_size=1)
    batches = list(loader)
    got = [(i, c) for b in batches for i, c in zip(b.image_ids, b.captions)]
    # train: one sample per pair; eval: one sample per image, expanded by the eval loader into one text per caption
    assert got == [(str(i), c) for i in GOOD for c in captions_of(i)]
    assert sum(sum(b.skipped.values()) for b in batches) == 0
    assert tuple(batches[0].images.shape[1:]) == (3, 32, 32)


# ---------------------------------------------------------------- Karpathy split json


@pytest.mark.parametrize("split, layout, ids, skipped", [
    ("test", "eval", ["11"], {"missing_file": 1}),
    ("val", "eval", ["12"], {}),
    ("train", "train", ["13", "16"], {"bad_image": 1}),  # train = train + restval
    ("train-only", "train", ["16"], {"bad_image": 1}),
    ("restval", "train", ["13"], {}),
])
def test_karpathy_split_selection(karpathy, tmp_path, capsys, split, layout, ids, skipped):
    out = tmp_path / split
    code, stdout, err = run(coco_argv(karpathy, out, "--split", split), capsys)
    assert code == 0, err
    samples = read_shards(out)
    metas = [json.loads(s["json"]) for s in samples.values()]
    assert sorted({m["image_id"] for m in metas}) == ids  # cocoid, not the imgid index
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == layout and report["format"] == "karpathy" and report["split"] == split
    assert report["skipped_images"] == skipped
    if layout == "eval":
        assert metas == [{"image_id": ids[0], "captions": captions_of(int(ids[0]))}]
    else:
        assert len(samples) == 5 * len(ids)
    assert stdout.strip().splitlines()[-1].startswith(f"use: \"data.{layout}.urls='{out}/")


def test_karpathy_images_dir_may_be_the_image_folder(karpathy, tmp_path, capsys):
    """--images pointing straight at val2014/ (no filepath level) works too, as for Flickr30k's folder."""
    code, _, err = run(coco_argv((karpathy[0], karpathy[1] / "val2014"), tmp_path / "o", "--split", "val"), capsys)
    assert code == 0, err
    assert [json.loads(s["json"])["image_id"] for s in read_shards(tmp_path / "o").values()] == ["12"]


def test_karpathy_flickr_layout_uses_imgid(tmp_path, capsys):
    images = tmp_path / "flickr30k-images"
    make_images(images)
    entries = [{"filename": FILES[i], "imgid": n, "split": "test",
                "sentences": [{"raw": c} for c in captions_of(i)]} for n, i in enumerate(GOOD)]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    assert run(["from-coco", "--annotations", str(path), "--images", str(images), "--out", str(tmp_path / "o"),
                "--split", "test", "--workers", "1"], capsys)[0] == 0
    metas = [json.loads(s["json"]) for s in read_shards(tmp_path / "o").values()]
    assert [m["image_id"] for m in metas] == ["0", "1", "2"]
    assert [m["captions"] for m in metas] == [captions_of(i) for i in GOOD]


# ---------------------------------------------------------------- unusable input: one error line, exit 2


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing_file", "error: annotations file not found:"),
    ("not_json", "is not valid JSON"),
    ("no_layout", "no images[] list, so no known layout"),
    ("instances", "annotations[] have no 'caption' field"),
    ("karpathy_no_split", "is a Karpathy split file (restval 1, test 2, train 2, val 1): choose the images with --split"),
    ("coco_restval", "--split restval needs a Karpathy split file"),
    ("no_images_dir", "--images"),
])
def test_unusable_input_is_one_error(coco, karpathy, tmp_path, capsys, case, expected):
    annotations, images, extra = coco[0], coco[1], []
    if case == "missing_file":
        annotations = tmp_path / "nope.json"
    elif case == "not_json":
        annotations = write(tmp_path / "x.json", "{not json")
    elif case == "no_layout":
        annotations = write(tmp_path / "x.json", json.dumps({"foo": []}))
    elif case == "instances":
        annotations = write(tmp_path / "x.json", json.dumps({"images": [], "annotations": [{"image_id": 1, "bbox": []}]}))
    elif case == "karpathy_no_split":
        annotations, images = karpathy
    elif case == "coco_restval":
        extra = ["--split", "restval"]
    elif case == "no_images_dir":
        images = tmp_path / "no_such_dir"
    out = tmp_path / "out"
    code, _, err = run(coco_argv((annotations, images), out, *extra), capsys)
    assert code == 2
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1
    assert not list(out.glob("*.tar")) if out.exists() else True


# ---------------------------------------------------------------- CSV


@pytest.fixture
def csv_file(tmp_path) -> Path:
    """Relative and absolute paths, two images with two captions, a URL row, an empty caption, a short
    row, a missing file and a corrupt image."""
    make_images(tmp_path / "imgs")
    rows = [
        ["imgs/a.jpg", "a red thing", "id-a"],
        ["imgs/b.png", "a blue thing", "id-b"],
        ["imgs/a.jpg", "something red", "id-a"],
        ["https://example.com/x.jpg", "remote", "id-x"],
        [str(tmp_path / "imgs" / "c.jpg"), "a green thing", "id-c"],
        ["imgs/c.jpg", "  ", "id-c"],
        ["imgs/missing.jpg", "gone", "id-m"],
        ["imgs/corrupt.jpg", "broken", "id-k"],
        ["imgs/b.png"],
    ]
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "image_id"])
        writer.writerows(rows)
    return path


def csv_argv(path: Path, out: Path, *extra: str) -> list[str]:
    return ["from-csv", str(path), "--image-col", "filepath", "--caption-col", "title", "--out", str(out),
            "--workers", "1", *extra]


def test_csv_train_layout_and_skips(csv_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(csv_argv(csv_file, out), capsys)
    assert code == 0, err
    pairs = [(json.loads(s["json"])["image_id"], s["txt"].decode()) for s in read_shards(out).values()]
    assert pairs == [("imgs/a.jpg", "a red thing"), ("imgs/a.jpg", "something red"),
                     ("imgs/b.png", "a blue thing"), (str(tmp_path / "imgs" / "c.jpg"), "a green thing")]
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_captions"] == {"url_not_downloaded": 1, "empty_caption": 1, "missing_field": 1,
                                          "missing_file": 1, "bad_image": 1}
    assert report["skipped_images"] == {"missing_file": 1, "bad_image": 1} and report["url_rows"] == 1
    assert "1 row(s) name http(s) URLs" in stdout
    assert (f"img2dataset --url_list {csv_file} --input_format csv --url_col filepath --caption_col title "
            f"--output_format webdataset --output_folder {out}-img2dataset") in stdout


def test_csv_eval_layout_groups_by_id_column(csv_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(csv_argv(csv_file, out, "--image-id-col", "image_id", "--layout", "eval"), capsys)
    assert code == 0, err
    metas = [json.loads(s["json"]) for s in read_shards(out).values()]
    assert metas == [{"image_id": "id-a", "captions": ["a red thing", "something red"]},
                     {"image_id": "id-b", "captions": ["a blue thing"]},
                     {"image_id": "id-c", "captions": ["a green thing"]}]
    assert "--save_additional_columns '[\"image_id\"]'" in stdout


def test_csv_image_root_and_tsv(tmp_path, capsys):
    make_images(tmp_path / "elsewhere")
    tsv = write(tmp_path / "list.tsv", "img\tcap\na.jpg\ta red thing\nb.png\ta blue thing\n")
    out = tmp_path / "out"
    argv = ["from-csv", str(tsv), "--image-col", "img", "--caption-col", "cap", "--out", str(out),
            "--image-root", str(tmp_path / "elsewhere"), "--workers", "1"]
    assert run(argv, capsys)[0] == 0
    assert [s["txt"].decode() for s in read_shards(out).values()] == ["a red thing", "a blue thing"]


def test_csv_unknown_column_names_the_columns(csv_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["from-csv", str(csv_file), "--image-col", "path", "--caption-col", "title",
                        "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --image-col 'path' is not a column of") and "'filepath', 'title', 'image_id'" in err
    assert not out.exists()


def test_csv_missing_file_is_one_error(tmp_path, capsys):
    code, _, err = run(["from-csv", str(tmp_path / "nope.csv"), "--image-col", "a", "--caption-col", "b",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err == f"error: CSV file not found: {tmp_path / 'nope.csv'}\n"


def test_csv_only_urls_prints_the_img2dataset_command_and_fails(tmp_path, capsys):
    path = write(tmp_path / "urls.csv", "url,caption\nhttps://e.com/1.jpg,one\nhttp://e.com/2.jpg,two\n")
    code, stdout, err = run(["from-csv", str(path), "--image-col", "url", "--caption-col", "caption",
                             "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: no usable samples: url_not_downloaded 2 rows")
    assert "img2dataset --url_list" in stdout and "--url_col url --caption_col caption" in stdout


# ---------------------------------------------------------------- the installed command, in a subprocess


@pytest.mark.slow
def test_cli_subprocess_with_worker_processes(coco, tmp_path, capsys):
    """`python -m mmpt.cli.data` with 2 decode processes writes the same bytes as the in-process run."""
    assert run(coco_argv(coco, tmp_path / "a", "--layout", "eval"), capsys)[0] == 0
    argv = coco_argv(coco, tmp_path / "b", "--layout", "eval")
    argv[argv.index("--workers") + 1] = "2"
    proc = subprocess.run([sys.executable, "-m", "mmpt.cli.data", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"use: \"data.eval.urls='{tmp_path / 'b'}/00000.tar'\""
    assert (tmp_path / "a" / "00000.tar").read_bytes() == (tmp_path / "b" / "00000.tar").read_bytes()
