"""`mmpt-data stats` / `mmpt-data show` on real tar shards with planted bad samples: counts by the loaders'
skip reasons, size and caption-length percentiles, and a contact sheet of the expected size and content."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from mmpt.cli.data import main
from mmpt.data.inspection import SheetLayout
from mmpt.data.tokenizer import train_wordpiece

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def png(colour: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, format="PNG")  # lossless: colours stay exact
    return buf.getvalue()


@pytest.fixture
def planted(write_shards) -> str:
    """Two shards: 4 good pairs (sizes 40x30, 20x50, 64x64, 30x30), one corrupt image, one without caption."""
    first = [
        {"__key__": "a", "png": png("red", (40, 30)), "txt": "a red thing"},
        {"__key__": "bad", "jpg": b"\xff\xd8 not really a jpeg", "txt": "a broken image"},
        {"__key__": "b", "png": png("green", (20, 50)), "txt": "green"},
    ]
    second = [
        {"__key__": "nocap", "png": png("white", (8, 8))},
        {"__key__": "c", "png": png("blue", (64, 64)), "txt": "a blue square on blue"},
        {"__key__": "d", "png": png("red", (30, 30)), "txt": "red again"},
    ]
    paths = write_shards([first, second], name="planted")
    return paths[0].replace("-00000.tar", "-{00000..00001}.tar")


def test_stats_counts_planted_corrupt_samples_by_reason_and_percentiles(planted, capsys):
    assert main(["stats", planted, "--max-text-len", "3"]) == 0
    out = capsys.readouterr().out
    assert "shards: 2\nsamples: 6 read, 4 usable, 2 skipped\n" in out
    assert "  bad_image: 1  e.g. sample 'bad' in " in out and "  missing_caption: 1  e.g. sample 'nocap'" in out
    # words per caption 3, 1, 5, 2 -> sorted 1 2 3 5; nearest rank sorted[ceil(p * 4) - 1]: p5 1, p50 2, p95 5
    assert "caption length (words; give --tokenizer for tokens): min 1 | p5 1 | p50 2 | p95 5 | max 5" in out
    assert "longer than 3 (truncated at data.max_text_len=3): 1 (25.0%)" in out
    assert "image width (px): min 20 | p5 20 | p50 30 | p95 64 | max 64" in out  # widths 40, 20, 64, 30
    assert "image height (px): min 30 | p5 30 | p50 30 | p95 64 | max 64" in out  # heights 30, 50, 64, 30


def test_stats_counts_tokens_with_the_tokenizer(planted, tmp_path, capsys):
    tok = train_wordpiece(["a red thing", "green", "a blue square on blue", "red again", "a broken image"], 100)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["stats", planted, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    # every word is in the vocabulary, plus [CLS] and [SEP]: 5, 3, 7, 4 tokens
    assert "special tokens included): min 3 | p5 3 | p50 4 | p95 7 | max 7" in capsys.readouterr().out


def test_show_writes_a_sheet_of_the_expected_size_without_the_skipped_samples(planted, tmp_path, capsys):
    out = tmp_path / "sheets" / "sheet.png"
    assert main(["show", planted, "-n", "3", "--tile", "32", "--out", str(out)]) == 0
    layout = SheetLayout(cols=2, rows=2, tile=32)  # ceil(sqrt(3)) columns
    cell_w, cell_h = 32 + 2 * 4, 32 + 4 * 12 + 3 * 4  # tile + padding; 4 caption lines of 12 px
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.size == layout.size == (2 * cell_w, 2 * cell_h)
        rgb = sheet.convert("RGB")
        centre = (4 + 16, 4 + 16)  # the middle of the first tile's image area
        tiles = [rgb.getpixel((centre[0] + (i % 2) * cell_w, centre[1] + (i // 2) * cell_h)) for i in range(3)]
    assert tiles == [COLOURS["red"], COLOURS["green"], COLOURS["blue"]]  # 'bad' and 'nocap' are not drawn
    assert "3 samples, transform none; 2 unusable samples skipped" in capsys.readouterr().out


def test_show_train_transform_and_errors(planted, tmp_path, capsys):
    out = tmp_path / "train.png"
    assert main(["show", planted, "-n", "1", "--tile", "16", "--transform", "train", "--image-size", "8",
                 "--out", str(out)]) == 0
    with Image.open(out) as sheet:
        r, g, b = sheet.convert("RGB").getpixel((4 + 8, 4 + 8))  # normalised and back: red within rounding
    assert r >= 254 and g <= 1 and b <= 1
    capsys.readouterr()  # the progress bar's lines
    assert main(["show", str(tmp_path / "missing-{0..1}.tar"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: shard not found")
    assert main(["show", planted, "-n", "0", "--out", str(out)]) == 2
    assert "error: -n must be >= 1" in capsys.readouterr().err
