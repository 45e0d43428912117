"""`surgery export`: adapted (or base) models to ONNX, verified against torch before anything is written.

Baked (default): adapter weights as initializers. `--swappable`: adapter slots that packs fill at run time.
`--route`: several adapted models' adapters in one graph, chosen per batch row by an `adapter_id` input.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import InputDtype, InputShape, Json, Output, Trust, emit_json, out, step
from exporters.onnx import export_onnx
from exporters.swappable import export_routed, export_swappable
from surgery.errors import SurgeryError
from surgery.io import check_output
from surgery.pipeline import default_output, open_model

Sources = Annotated[
    Optional[list[str]],
    typer.Argument(help="The model to export (default minilm); with --route, two or more .adapted.pt2 files."),
]


def export(
    sources: Sources = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export ONNX (the only format until TensorRT lands).")] = True,
    swappable: Annotated[bool, typer.Option("--swappable", help="Adapter slots for packs, chosen per run.")] = False,
    route: Annotated[bool, typer.Option("--route", help="Stack several models' adapters; adapter_id input per row.")] = False,
    output: Output = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest |ORT - torch| accepted (fp32).")] = 1e-4,
    trust: Trust = False,
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    json: Json = False,
) -> None:
    """Export to ONNX with dynamic batch and sequence; written only if ONNX Runtime matches torch."""
    sources = sources or [None]
    if swappable and route:
        raise SurgeryError("--swappable and --route are two kinds of export; choose one")
    if len(sources) > 1 and not route:
        raise SurgeryError(f"{len(sources)} models given; export takes one, or several with --route")
    suffix = ".routed.onnx" if route else ".swappable.onnx" if swappable else ".onnx"
    path = check_output(output or default_output(sources[0], suffix))
    with step(f"load {', '.join(s or 'minilm' for s in sources)}"):
        models = [open_model(s, trust=trust, input_shapes=input_shape, input_dtype=input_dtype) for s in sources]
    with step(f"export {path} and check it against torch"):
        if route:
            result = export_routed(models, path, tolerance=tolerance)
        elif swappable:
            result = export_swappable(models[0], path, tolerance=tolerance)
        else:
            result = export_onnx(models[0].gm, models[0].signature, path, tolerance=tolerance)
    data = result.to_json()
    if json:
        emit_json(data)
        return
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    out.print(f"max |ORT - torch| = {data['max_abs_diff']:.2e} (tolerance {data['tolerance']:g})")
    if swappable:
        out.print(f"{data['adapter_tensors']} adapter slots; no pack = base model, own pack = adapted model: both checked")
    if route:
        out.print(f"{len(data['route'])} adapters stacked at rank {data['padded_rank']}; rows checked with ids {data['checked_ids']}")
