"""Options renamed to one spelling across commands (`-o/--output`, `--atol`, `--engine-shape`): the earlier spellings
(`--out` on `bench` and `demo`, `--save` on `run`, `--tolerance` on `export` and `run`, `--shapes` on `export`) keep
working for one release, with a deprecation line on stderr, and are hidden from --help."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.common import renamed
from cli.main import commands
from surgery.errors import SurgeryError

COMMANDS = commands()


@pytest.mark.parametrize(
    "command, old, new, value, param, new_param",
    [
        ("demo", "--out", "-o", "x", "old_out", "out_dir"),
        ("bench", "--out", "--output", "x", "old_out", "out_dir"),
        ("export", "--tolerance", "--atol", "0.001", "tolerance", "atol"),
        ("run", "--tolerance", "--atol", "0.001", "tolerance", "atol"),
        ("run", "--save", "--output", "x.npz", "old_save", "save"),
    ],
)
def test_both_spellings_parse_and_only_the_new_one_is_shown(command, old, new, value, param, new_param):
    cmd = COMMANDS[command]
    args = ["m.adapted.pt2"] if command in ("bench", "run") else []
    ctx = cmd.make_context(command, [*args, old, value])
    assert str(ctx.params[param]) == value
    ctx = cmd.make_context(command, [*args, new, value])
    assert str(ctx.params[new_param]) == value
    shown = [o for p in cmd.get_params(ctx) if not getattr(p, "hidden", False) for o in p.opts]
    assert new in shown and old not in shown


def test_engine_shape_takes_shapes_repeated_under_either_spelling():
    cmd = COMMANDS["export"]
    ctx = cmd.make_context("export", ["--shapes", "batch=1:2:4", "--shapes", "prefill:seq=1:8:16"])
    assert (
        ctx.params["old_shapes"] == ["batch=1:2:4", "prefill:seq=1:8:16"] and not ctx.params["shapes"]
    )  # () at the click level: None in the function
    ctx = cmd.make_context("export", ["--engine-shape", "batch=1:2:4", "--engine-shape", "prefill:seq=1:8:16"])
    assert ctx.params["shapes"] == ["batch=1:2:4", "prefill:seq=1:8:16"] and not ctx.params["old_shapes"]
    shown = [o for p in cmd.get_params(ctx) if not getattr(p, "hidden", False) for o in p.opts]
    assert "--engine-shape" in shown and "--shapes" not in shown


def test_export_refuses_shapes_and_engine_shape_together(cli):
    run = cli("export", "--trt", "--shapes", "batch=1:2:4", "--engine-shape", "batch=1:2:4")
    assert run.code == 2
    assert "--shapes and --engine-shape are one option under two names; give --engine-shape only" in run.stderr


def test_the_old_spelling_gives_its_value_and_a_deprecation_line(capsys):
    assert renamed(Path("out"), Path("mine"), "--output", "--out", default=Path("out")) == Path("mine")
    assert "warning: --out is deprecated" in capsys.readouterr().err
    assert renamed(1e-3, None, "--atol", "--tolerance") == 1e-3
    assert capsys.readouterr().err == ""
    with pytest.raises(SurgeryError, match="give --atol only"):
        renamed(1e-3, 1e-2, "--atol", "--tolerance")


@pytest.mark.slow  # an export of a small config, as a subprocess
def test_export_takes_tolerance_as_atol(small_config, tmp_path, cli):
    """End to end: the old spelling's value reaches the parity check, and the run says it is deprecated."""
    config = small_config("bert")
    run = cli("export", config, "--tolerance", "3e-4", "-o", "m.onnx", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "warning: --tolerance is deprecated" in run.stderr
    assert run.json["tolerance"] == 3e-4
