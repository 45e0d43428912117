"""`surgery export`: an adapted (or base) model to ONNX, verified against torch before it is written."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import InputDtype, InputShape, Json, Output, Source, Trust, emit_json, out, step
from exporters.onnx import export_onnx
from surgery.io import check_output
from surgery.pipeline import default_output, open_model


def export(
    source: Source = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export baked ONNX (adapter weights as initializers).")] = True,
    output: Output = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest |ORT - torch| accepted (fp32).")] = 1e-4,
    trust: Trust = False,
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    json: Json = False,
) -> None:
    """Export to ONNX with dynamic batch and sequence; written only if ONNX Runtime matches torch."""
    path = check_output(output or default_output(source, ".onnx"))
    with step(f"load {source or 'minilm'}"):
        captured = open_model(source, trust=trust, input_shapes=input_shape, input_dtype=input_dtype)
    with step(f"export {path} and check it against torch"):
        result = export_onnx(captured.gm, captured.signature, path, tolerance=tolerance)
    if json:
        emit_json(result.to_json())
        return
    p = result.parity
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {result.seconds:.1f} s")
    out.print(f"max |ORT - torch| = {p.max_abs_diff:.2e} (tolerance {p.tolerance:g}) on shapes {p.shapes}")
