"""`surgery insert`: adapters into a model's graph, saved as NAME.adapted.pt2."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import emit_json, out, step
from cli.options import (
    Task,
    Act,
    Alpha,
    Dtype,
    InputDtype,
    InputShape,
    Json,
    Method,
    Output,
    Rank,
    Scale,
    Source,
    Targets,
    Trust,
)
from surgery.adapters import AdapterSpec, parse_spec
from surgery.bundle import SUFFIX, save_adapted
from surgery.insert import houlsby_params
from surgery.io import check_output
from surgery.pipeline import adapt, default_output, open_model


def insert(
    source: Source = None,
    r: Rank = "8",
    method: Method = "houlsby",
    act: Act = "relu",
    targets: Targets = None,
    alpha: Alpha = None,
    scale: Scale = 1.0,
    output: Output = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the down-projections' random init.")] = 0,
    trust: Trust = False,
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    dtype: Dtype = "auto",
    task: Task = None,
    json: Json = False,
) -> None:
    """Insert adapters (bottlenecks x + W_up σ(W_down x), parallel, LoRA) at the chosen sites; the base stays frozen."""
    spec = parse_spec(method, r, act, targets, alpha, scale)
    path = check_output(output or default_output(source, SUFFIX))
    with step(f"load and capture {source or 'minilm'}"):
        captured = open_model(
            source, trust=trust, input_shapes=input_shape, input_dtype=input_dtype, dtype=dtype, task=task
        )
    with step(f"insert {method} adapters, r={r}" + ("" if method == "lora" else f", σ={act}")):
        report = adapt(captured, spec, seed=seed)
    with step(f"save {path}"):
        save_adapted(path, captured, spec, report)
    layers = len({s.layer for s in report.sites})
    widths = {s.width for s in report.sites}
    houlsby = isinstance(spec, AdapterSpec) and method == "houlsby" and targets is None and len(widths) == 1
    formula = houlsby_params(layers, widths.pop(), spec.r) if houlsby else None
    if json:
        emit_json(
            {
                "output": str(path),
                "task": captured.task,
                **spec.to_json(),
                "sites": [s.path for s in report.sites],
                "trainable_params": report.trainable,
                "total_params": report.total,
                "houlsby_formula_params": formula,
            }
        )
        return
    out.print(
        f"{len(report.sites)} sites in {layers} layers: {report.trainable:,} trainable of {report.total:,} parameters "
        f"({captured.task})"
    )
    if formula is not None:
        verdict = "equal" if formula == report.trainable else "[red]DIFFERENT[/]"
        out.print(f"seed formula 2L(2·d·r + d + r) = {formula:,}: {verdict}")
    out.print(f"wrote {path}")
