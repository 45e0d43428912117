"""`surgery demo`: the main job on the embedded pretrained MiniLM, as a table (and Markdown, JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from benchmarks.demo import run_demo
from cli.common import emit_json, out, renamed, step
from cli.options import Json, OldOut, OutputFolder, with_help


def demo(
    out_dir: with_help(OutputFolder, "Folder for the models and the report.") = Path("out"),
    r: Annotated[int, typer.Option("--r", help="Bottleneck size.")] = 8,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model.")] = 100,
    old_out: OldOut = None,
    json: Json = False,
) -> None:
    """Houlsby r=8 into pretrained MiniLM, export ONNX, verify, time base against adapted."""
    out_dir = renamed(out_dir, old_out, "--output", "--out", default=Path("out"))
    result = run_demo(out_dir, step, r=r, runs=runs)
    if json:
        emit_json(result.to_json())
        return
    table = Table(title=f"surgery demo: Houlsby r={r} in pretrained all-MiniLM-L6-v2", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in result.rows():
        table.add_row(k, v)
    out.print(table)
    out.print(f"wrote {out_dir}/minilm.adapted.pt2, minilm.base.onnx, minilm.adapted.onnx, demo.md, demo.json")
