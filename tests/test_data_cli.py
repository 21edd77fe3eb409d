"""`mmpt-data`: synthetic shards and tokenizer training, with user errors as `error: ...` + exit code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mmpt.cli.data import main
from mmpt.data.synthetic import COLOURS, RELATIONS, SHAPES, SIZES


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    assert main(["synthetic", "--out", str(out), "--num-samples", "60", "--shard-size", "20", "--seed", "1"]) == 0
    return out


def test_synthetic_writes_shards_and_reports(tmp_path, capsys):
    code = main(["synthetic", "--out", str(tmp_path), "--num-samples", "7", "--shard-size", "3", "--seed", "0",
                 "--image-size", "64", "--start-index", "0", "--prefix", ""])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert "7 samples in 3 shards" in out and "samples/s" in out and str(tmp_path) in out
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1}


def test_synthetic_prefix_names_files_and_keys(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path), "--num-samples", "2", "--prefix", "val-"]) == 0
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"val-00000.tar": 2}


def test_tokenizer_trains_on_shards(shard_dir, tmp_path, capsys):
    tok_path = tmp_path / "tok" / "tokenizer.json"
    code = main(["tokenizer", "--shards", f"{shard_dir}/{{00000..00002}}.tar", "--out", str(tok_path), "--vocab-size", "200"])
    assert code == 0
    out = capsys.readouterr().out
    assert "vocab size" in out and str(tok_path) in out
    tok = Tokenizer.from_file(str(tok_path))
    words = [*SIZES, *COLOURS, *SHAPES, *" ".join(RELATIONS).split()]
    for text in ["a small blue square to the left of a large yellow triangle", " ".join(words)]:
        tokens = tok.encode(text).tokens
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        assert "[UNK]" not in tokens, tokens


@pytest.mark.parametrize("pattern", ["{d}/*.tar", "{d}/00000.tar,{d}/0000{{1,2}}.tar"])
def test_tokenizer_accepts_globs_and_lists(shard_dir, tmp_path, pattern):
    shards = pattern.format(d=shard_dir)
    assert main(["tokenizer", "--shards", shards, "--out", str(tmp_path / "t.json"), "--vocab-size", "100"]) == 0


def test_missing_shard_is_one_clear_error(shard_dir, tmp_path, capsys):
    code = main(["tokenizer", "--shards", f"{shard_dir}/{{00000..00005}}.tar", "--out", str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: shard not found:") and "00003.tar" in err and "mmpt-data synthetic" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.json").exists()


def test_unreadable_shard_is_an_error(tmp_path, capsys):
    bad = tmp_path / "00000.tar"
    bad.write_bytes(b"not a tar")
    assert main(["tokenizer", "--shards", str(bad), "--out", str(tmp_path / "t.json")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read captions")


@pytest.mark.parametrize(
    "argv",
    [
        ["synthetic", "--out", "{d}", "--num-samples", "4", "--shard-size", "3", "--start-index", "2"],
        ["synthetic", "--out", "{d}", "--num-samples", "0"],
        ["tokenizer", "--shards", "{d}/*.tar", "--out", "{d}/t.json"],
        ["tokenizer", "--shards", "{d}/x.tar", "--out", "{d}/t.json", "--vocab-size", "3"],
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, argv):
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_argparse_errors_return_nonzero(capsys):
    assert main([]) == 2
    assert main(["synthetic"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow  # a CLI subprocess
def test_console_script_exit_code(tmp_path):
    """The real process: message on stderr, exit status 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "mmpt.cli.data", "tokenizer", "--shards", str(tmp_path / "00000.tar"), "--out", "t.json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: shard not found:") and "Traceback" not in proc.stderr


def test_every_mmpt_data_option_has_help_text():
    import argparse

    from mmpt.cli.data import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in subparsers.choices.items() for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert len(subparsers.choices) >= 7 and missing == []
