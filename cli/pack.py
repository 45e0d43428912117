"""`surgery pack`: an adapted model's adapter tensors alone, as .onnx_adapter or .safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import emit_json, out, step
from cli.options import Json, Output, Trust
from surgery.errors import SurgeryError
from surgery.packs import SUFFIXES, load_pack, pack_from_model, save_pack
from surgery.pipeline import default_output, open_model


def pack(
    source: Annotated[str, typer.Argument(help="An .adapted.pt2, or a pack to convert to the other format.")],
    output: Output = None,
    json: Json = False,
    trust: Trust = False,
) -> None:
    """Write the adapter pack of an adapted model (or convert a pack between formats)."""
    path = Path(output) if output else default_output(source, ".onnx_adapter")
    if Path(source).suffix in SUFFIXES:
        result = load_pack(source)
    else:
        with step(f"load {source}"):
            captured = open_model(source, trust=trust)
        if captured.manifest is None:
            raise SurgeryError(f"{source} is not an adapted model; run `surgery insert` first, then pack its output")
        result = pack_from_model(captured.gm.state_dict(), captured.manifest)
    info = {"output": str(path), **result.describe()}  # describes (or refuses) the pack before writing it
    save_pack(result, path)
    if json:
        emit_json(info)
        return
    out.print(f"wrote {path}: {info['tensors']} tensors, {info['parameters']:,} parameters, rank {info['rank']}")
