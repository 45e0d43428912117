"""`surgery bench`: latency of an adapted model against its base, each case in its own process."""

from __future__ import annotations

from dataclasses import asdict
from itertools import product
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from benchmarks.harness import BACKENDS, run_grid, write_reports
from benchmarks.variants import prepare_adapted
from cli.common import emit_json, err, out, renamed, step
from cli.options import Adapted, Json, OldOut, OutputFolder, with_help
from surgery.errors import SurgeryError


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise SurgeryError(f"{what} {text!r}: give comma-separated integers, e.g. 1,16") from exc


def bench(
    source: Adapted,
    backends: Annotated[str, typer.Option("--backends", help=", ".join(BACKENDS))] = "torch,ort",
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1",
    seq: Annotated[str, typer.Option("--seq", help="Sequence lengths, comma-separated.")] = "128",
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved rounds after 2 warm-up rounds.")] = 10,
    calls: Annotated[int, typer.Option("--calls", help="Timed calls per case per round.")] = 5,
    threads: Annotated[int, typer.Option("--threads", help="Threads per case (torch and ORT).")] = 2,
    out_dir: with_help(OutputFolder, "Folder for results.md, results.json, results.png.") = Path("out/bench"),
    old_out: OldOut = None,
    json: Json = False,
) -> None:
    """Time base, adapted and swappable variants (and, on torch CUDA, the --fused-pt2 program) across a grid;
    write Markdown, JSON and a PNG plot."""
    out_dir = renamed(out_dir, old_out, "--output", "--out", default=Path("out/bench"))
    grid = list(product(_ints(batch, "--batch"), _ints(seq, "--seq")))
    with step(f"export the variants of {source}"):
        cuda = any(b.startswith("torch-cuda") for b in backends.split(","))
        artifacts = prepare_adapted(source, out_dir / "artifacts", kernel=cuda)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("timing", total=len(grid) * (rounds + 2))
        rows = run_grid(
            source,
            artifacts,
            backends.split(","),
            grid,
            rounds,
            calls,
            2,
            threads,
            on_round=lambda: progress.advance(task),
            on_skip=lambda b, why: err.print(f"[yellow]skipping {b}: {why}[/]"),
        )
    paths = write_reports(rows, out_dir, f"{Path(source).name}: latency against its base")
    if json:
        emit_json({"results": [asdict(r) for r in rows], "reports": {k: str(v) for k, v in paths.items()}})
        return
    out.print(paths["md"].read_text())
    out.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
