"""`surgery count`: trainable parameters of an adapter spec on a model shape, from its config alone."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import emit_json, out, step
from cli.options import Act, Alpha, Json, Method, Rank, Scale, Targets
from surgery.adapters import parse_spec
from surgery.count import BUILTIN, count as count_params


def count(
    source: Annotated[
        str, typer.Argument(help=f"A config.json, a model folder, 'minilm', or a built-in shape: {', '.join(BUILTIN)}.")
    ],
    method: Method = "houlsby",
    r: Rank = "8",
    act: Act = "relu",
    targets: Targets = None,
    alpha: Alpha = None,
    scale: Scale = 1.0,
    json: Json = False,
) -> None:
    """Count the adapter parameters the insert pass would create, on the meta device: no weights needed."""
    spec = parse_spec(method, r, act, targets, alpha, scale)
    with step(f"build {source} on the meta device and create its adapters"):
        report = count_params(source, spec)
    if json:
        emit_json(report.to_json())
        return
    b = report.pack_bytes()
    out.print(
        f"[bold]{source}[/] ({report.model_type}, {report.layers} layers, d_model {report.d_model}, "
        f"{report.base:,} parameters)"
    )
    out.print(
        f"{method} r={r}: {report.sites} sites, {report.trainable:,} trainable parameters "
        f"({report.trainable / 1e6:.1f}M, {100 * report.share:.4f}% of the base)"
    )
    out.print(f"adapter pack: {b['fp32'] / 1e6:.1f} MB at fp32, {b['fp16'] / 1e6:.1f} MB at fp16")
    if report.formula is not None:
        verdict = "equal" if report.formula == report.trainable else "[red]DIFFERENT[/]"
        out.print(f"seed formula {report.formula_text} = {report.formula:,}: {verdict}")
