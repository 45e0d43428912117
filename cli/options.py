"""The options and arguments that several commands take, each declared once as an `Annotated` alias.

A command takes an alias as it is (`json: Json = False`), or under its own help panel (`in_panel`) or with help of
its own (`with_help`): the names, the type and whatever else the declaration says stay the same. The earlier
spellings kept for one release (`Old*`) are hidden; `cli.common.renamed` reads them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery.task_names import TASK_HELP

# what a command reads
Source = Annotated[
    Optional[str],
    typer.Argument(
        help="A Hugging Face model folder, a config.json (random weights), a .pt2, a .pt (with --trust), "
        "or 'minilm' (default)."
    ),
]
Adapted = Annotated[str, typer.Argument(help="An adapted model: the .adapted.pt2 that `surgery insert` wrote.")]
Base = Annotated[
    str, typer.Option("--base", help="The base model it was trained on: a HF folder, a config.json, or 'minilm'.")
]
Trust = Annotated[
    bool,
    typer.Option(
        "--trust", help="Run code from a model file you trust: unpickle a .pt, or a .pt2 that holds more than tensors."
    ),
]
InputShape = Annotated[
    Optional[list[str]],
    typer.Option(
        "--input-shape",
        help="Input shape of a plain nn.Module, e.g. batch,seq,64 (names are dynamic axes). Once per input.",
    ),
]
InputDtype = Annotated[str, typer.Option("--input-dtype", help="dtype of the --input-shape inputs.")]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Weights in auto (the checkpoint's own), fp32, fp16 or bf16; adapters and ONNX follow the model.",
    ),
]
Task = Annotated[Optional[str], typer.Option("--task", help=TASK_HELP)]

# what a command writes
Output = Annotated[Optional[str], typer.Option("-o", "--output", help="Output file (written atomically).")]
OutputFolder = Annotated[Path, typer.Option("-o", "--output", help="Folder to write into.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]

# the adapter spec (surgery.adapters.parse_spec)
Method = Annotated[
    str, typer.Option("--method", help="houlsby, pfeiffer, parallel (beside the feed-forward block) or lora.")
]
Rank = Annotated[
    str,
    typer.Option(
        "--r",
        help="Bottleneck size (1 <= r < d_model); for lora a rank for every --targets projection, "
        "or per projection: q=2,k=2,v=2,o=2.",
    ),
]
Act = Annotated[
    str,
    typer.Option(
        "--act", help="Activation σ of a bottleneck: relu, gelu, silu, tanh, identity (a linear adapter, mergeable)."
    ),
]
Targets = Annotated[
    Optional[str],
    typer.Option(
        "--targets",
        help="Regex over module paths (overrides the architecture's sites); for lora, projections: "
        "q,k,v,o,ffn_in,ffn_gate,ffn_out (default q,v).",
    ),
]
Alpha = Annotated[
    Optional[float],
    typer.Option("--alpha", help="lora: the delta is scaled by alpha/r (default alpha = r: scaling 1)."),
]
Scale = Annotated[float, typer.Option("--scale", help="parallel: scale s of the branch, y + s·W_up σ(W_down x).")]

# the parity check (surgery.parity)
ATOL_HELP = "the parity check's absolute part: per output, max|a - torch| <= atol + rtol x max|torch|"
RTOL_HELP = "the parity check's relative part: the share of each output's largest magnitude max|torch| allowed on top"

# earlier spellings, hidden, kept working for one release with a deprecation line (`cli.common.renamed`)
OldTolerance = Annotated[Optional[float], typer.Option("--tolerance", hidden=True)]  # --atol
OldOut = Annotated[Optional[Path], typer.Option("--out", hidden=True)]  # -o/--output of bench and demo
OldSave = Annotated[Optional[Path], typer.Option("--save", hidden=True)]  # -o/--output of run
OldShapes = Annotated[Optional[list[str]], typer.Option("--shapes", hidden=True)]  # --engine-shape of export


def _changed(alias: Any, **fields: Any) -> Any:
    info = copy.copy(alias.__metadata__[0])
    for name, value in fields.items():
        setattr(info, name, value)
    return Annotated[alias.__origin__, info]


def in_panel(alias: Any, panel: str) -> Any:
    """A shared alias, shown under the help panel `panel` of one command's --help."""
    return _changed(alias, rich_help_panel=panel)


def with_help(alias: Any, help: str) -> Any:
    """A shared alias with the help text of one command (what this command reads or writes through it)."""
    return _changed(alias, help=help)
