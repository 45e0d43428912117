"""`surgery swap` (refit a TensorRT engine's adapters from a pack) and `surgery check-trt` (static ONNX check)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import emit_json, out, step
from cli.options import Json, Output
from exporters.tensorrt import refit_engine
from exporters.trt_check import check_trt as run_check


def swap(
    engine: Annotated[Path, typer.Argument(help="A refittable engine (export --trt --swappable --max-r R).")],
    pack: Annotated[Path, typer.Argument(help="An adapter pack: .safetensors or .onnx_adapter.")],
    output: Output = None,
    json: Json = False,
) -> None:
    """Refit the engine's adapter weights from a pack, in place (or to -o), without a rebuild."""
    with step(f"refit {engine} with {pack.name}"):
        sidecar = refit_engine(engine, pack, output)
    target = output or engine
    if json:
        emit_json({"engine": str(target), **sidecar["pack"], "max_r": sidecar["max_r"]})
        return
    out.print(f"wrote {target}: adapters from {pack} (rank {sidecar['pack']['rank']}, padded to {sidecar['max_r']})")


def check_trt(
    model: Annotated[Path, typer.Argument(help="An ONNX model.")],
    json: Json = False,
) -> None:
    """List the operators, data types and shapes TensorRT's ONNX parser does not take (no TensorRT needed)."""
    result = run_check(model)
    if json:
        emit_json(result.to_json())
    else:
        ops = ", ".join(f"{k}×{v}" for k, v in result.operators.items())
        out.print(f"{model}: {sum(result.operators.values())} nodes ({ops})", soft_wrap=True)
        out.print(f"checked against TensorRT {result.tensorrt}'s ONNX parser table ({result.source})")
        for f in result.findings:
            colour = "red" if f.severity == "error" else "yellow"
            out.print(f"[{colour}]{f.severity}[/] {f.kind} {f.where}: {f.what}", soft_wrap=True)
        for op, note in result.notes.items():
            out.print(f"[dim]note {op}: {note}[/]", soft_wrap=True)
        out.print(
            "[green]clean[/]: TensorRT's parser takes every node"
            if result.clean
            else f"[red]{len(result.errors)} problem(s)[/]"
        )
    if not result.clean:
        raise typer.Exit(1)
