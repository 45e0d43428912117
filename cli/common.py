"""What every command shares: option aliases, progress steps, output, and the user-error exit."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from surgery.quiet import quiet_libraries  # noqa: F401  (moved down: benchmarks use it too)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

Source = Annotated[
    Optional[str],
    typer.Argument(help="A Hugging Face model folder, a config.json (random weights), a .pt2, a .pt (with --trust), or 'minilm' (default)."),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Trust = Annotated[bool, typer.Option("--trust", help="Allow unpickling a .pt file: that runs code from the file.")]
InputShape = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", help="Input shape of a plain nn.Module, e.g. batch,seq,64 (names are dynamic axes). Once per input."),
]
InputDtype = Annotated[str, typer.Option("--input-dtype", help="dtype of the --input-shape inputs.")]
Output = Annotated[Optional[str], typer.Option("-o", "--output", help="Output file (written atomically).")]
Targets = Annotated[
    Optional[str],
    typer.Option("--targets", help="Regex over module paths (overrides the architecture's sites); for lora, projections: q,k,v,o,ffn_in,ffn_gate,ffn_out (default q,v)."),
]
Method = Annotated[str, typer.Option("--method", help="houlsby, pfeiffer, parallel (beside the feed-forward block) or lora.")]
Rank = Annotated[
    str, typer.Option("--r", help="Bottleneck size (1 <= r < d_model); for lora a rank for every --targets projection, or per projection: q=2,k=2,v=2,o=2.")
]
Act = Annotated[str, typer.Option("--act", help="Activation σ of a bottleneck: relu, gelu, silu, tanh, identity (a linear adapter, mergeable).")]
Alpha = Annotated[Optional[float], typer.Option("--alpha", help="lora: the delta is scaled by alpha/r (default alpha = r: scaling 1).")]
Scale = Annotated[float, typer.Option("--scale", help="parallel: scale s of the branch, y + s·W_up σ(W_down x).")]


@contextmanager
def step(label: str) -> Iterator[None]:
    """A spinner while `label` runs, then a tick and the seconds it took (on stderr)."""
    start = time.perf_counter()
    with err.status(f"{label} ..."):
        yield
    err.print(f"[green]✓[/] {label} [dim]({time.perf_counter() - start:.1f} s)[/]")


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    sys.stdout.flush()
