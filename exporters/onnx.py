"""Baked ONNX: the adapted GraphModule through the dynamo exporter, adapter weights as ordinary initializers.

Dynamic batch and sequence axes come from the capture's `Signature`. Every export is checked against
torch in ONNX Runtime (see verify.py) before it is renamed into place: a model that fails the check is
never written at the output path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx
from torch.utils import _pytree as pytree

from exporters.verify import Parity, check_onnx
from surgery.errors import SurgeryError
from surgery.io import atomic_output
from surgery.signature import Signature

OPSET = 20


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX model, its parity with torch and how long the export took."""

    path: Path
    parity: Parity
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"onnx": str(self.path), "export_seconds": round(self.seconds, 2), **self.parity.to_json()}


def output_names(outputs: Any) -> list[str]:
    """Names of a model's output leaves: dict/ModelOutput keys, `output_i` for tuples, `output` for a tensor."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names = []
    for i, (path, _) in enumerate(leaves):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", i)))) for k in path]
        names.append("_".join(keys) if keys else "output")
    if len(names) > 1 and all(n.isdigit() for n in names):
        names = [f"output_{n}" for n in names]
    return names


def export_onnx(
    gm: fx.GraphModule, signature: Signature, path: str | Path, *, tolerance: float = 1e-4
) -> OnnxExport:
    """Export `gm` to ONNX at `path` with dynamic axes, verify it in ONNX Runtime, then move it into place."""
    start = time.perf_counter()
    examples = signature.examples()
    args, kwargs = signature.export_args(examples)
    names = list(signature.outputs)
    if not names:
        with torch.no_grad():
            names = output_names(signature.call(gm, examples))
    with atomic_output(path) as tmp:
        try:
            program = torch.onnx.export(
                gm,
                args,
                kwargs=kwargs,
                dynamic_shapes=signature.dynamic_shapes(),
                input_names=signature.names,
                output_names=names,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; its first line says which op failed
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SurgeryError(f"{path}: ONNX export failed ({type(exc).__name__}: {first})") from exc
        program.save(tmp, external_data=False)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise SurgeryError(f"{path}: the exported model fails onnx.checker ({exc}); nothing was written") from exc
        seconds = time.perf_counter() - start
        parity = check_onnx(tmp, gm, signature, tolerance=tolerance)
        if not parity.ok:
            raise SurgeryError(
                f"{path}: ONNX Runtime differs from torch by {parity.max_abs_diff:.3g} "
                f"(tolerance {tolerance:g}) at {parity.worst}; nothing was written"
            )
    return OnnxExport(path=Path(path), parity=parity, seconds=seconds)
