"""`surgery export` (cli/export.py): the command parses its options into an `ExportOptions`, plans and runs."""

from __future__ import annotations

from dataclasses import fields

from cli.main import commands
from exporters.plan import QUANT_OPTIONS, ExportOptions


def test_export_options_default_as_the_command_does():
    """`ExportOptions` (exporters/plan.py) takes the command's defaults: `--block-size` and the other options of
    `--quantize` are refused alone by comparing them with these."""
    ctx = commands()["export"].make_context("export", [])
    defaults = {f.name: f.default for f in fields(ExportOptions)}
    for name in QUANT_OPTIONS + ("r", "act", "input_dtype", "dtype"):
        assert ctx.params[name] == defaults[name], name
