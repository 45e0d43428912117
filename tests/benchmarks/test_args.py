"""The benchmark programs' `-o/--output`, and `--out`, its earlier spelling kept for one release."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from benchmarks.args import add_output


def _parser(default):
    parser = argparse.ArgumentParser(prog="bench")
    add_output(parser, default, "where the reports go", type=Path)
    return parser


@pytest.mark.parametrize("default", [Path("out/x"), None])
def test_both_spellings_give_the_value_and_only_the_old_one_warns(default, capsys):
    parser = _parser(default)
    assert parser.parse_args([]).out == default
    assert parser.parse_args(["-o", "a"]).out == Path("a")
    assert parser.parse_args(["--output", "b"]).out == Path("b")
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["--out", "c"]).out == Path("c")
    assert "warning: --out is deprecated and goes in the next release; use --output" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--out", "a", "-o", "b"], ["--output", "a", "--out", "b"]])
def test_both_spellings_at_once_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser(Path("out/x")).parse_args(argv)
    assert exit_.value.code == 2
    assert "--out and --output are one option under two names; give --output only" in capsys.readouterr().err


def test_help_shows_the_new_spelling_only(capsys):
    with pytest.raises(SystemExit):
        _parser(None).parse_args(["--help"])
    text = capsys.readouterr().out
    assert "-o OUTPUT, --output OUTPUT" in text and "--out " not in text


def test_no_program_declares_out_of_its_own():
    """Every benchmark program that writes reports names it -o/--output, through add_output."""
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    own = [
        p.name
        for p in root.glob("*.py")
        if p.name != "args.py" and re.search(r"add_argument\(\s*['\"]--out['\"]", p.read_text())
    ]
    assert own == []
    assert len([p for p in root.glob("*.py") if "add_output(" in p.read_text()]) >= 13
