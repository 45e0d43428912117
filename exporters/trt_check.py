"""`check-trt`: what in an ONNX model TensorRT's ONNX parser will not take, found without TensorRT.

The rules come from the parser's own support matrix, kept as data in `trt_onnx_operators.json` with its
source (onnx-tensorrt `docs/operators.md`) and the TensorRT version it describes:
- an operator marked N, or of a domain other than the default one (it would need a plugin);
- an operator whose first input has a data type outside the operator's supported types;
- a tensor of a data type TensorRT does not have (strings, complex, unsigned other than UINT8...);
- UINT8 anywhere but a graph input or output; DOUBLE (accepted, cast down: a warning);
- an opset outside the supported range; a tensor of rank above 8 (TensorRT's `Dims::MAX_DIMS`).
Restrictions the table states in words (e.g. "axes must be an initializer") are listed as notes for the
operators present, not checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import onnx

from surgery.errors import SurgeryError
from runtime.files import check_onnx_data

TABLE = Path(__file__).with_name("trt_onnx_operators.json")
MAX_DIMS = 8  # nvinfer1::Dims::MAX_DIMS
# ONNX TensorProto type -> the name the support matrix uses
TYPE_NAMES = {
    "FLOAT": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "DOUBLE": "DOUBLE",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
    "FLOAT8E4M3FN": "FP8",
    "INT4": "INT4",
    "FLOAT4E2M1": "FP4",
}


@cache
def support_table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


@dataclass
class Finding:
    kind: str  # operator | dtype | opset | shape
    where: str  # node or tensor name
    what: str
    severity: str = "error"  # error: the parser refuses it; warning: accepted with a change

    def to_json(self) -> dict[str, str]:
        return self.__dict__.copy()


@dataclass
class TrtCheck:
    path: str
    tensorrt: str
    source: str
    operators: dict[str, int]
    findings: list[Finding] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # op -> restriction stated by the table

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def clean(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.path,
            "clean": self.clean,
            "checked_against": {"tensorrt": self.tensorrt, "source": self.source},
            "operators": self.operators,
            "findings": [f.to_json() for f in self.findings],
            "restrictions_to_review": self.notes,
        }


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type)


def check_trt(path: str | Path) -> TrtCheck:
    """Check an ONNX file against TensorRT's ONNX parser support matrix."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: no such ONNX file")
    check_onnx_data(path)  # before onnx.load reads external data: it must lie beside the model
    try:
        model = onnx.load(str(path))
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises DecodeError, ValueError, InferenceError...
        raise SurgeryError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    table = support_table()
    ops = table["operators"]
    lo, hi = table["opset"]
    result = TrtCheck(str(path), table["tensorrt"], table["source"], {})
    add = result.findings.append

    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            add(Finding("opset", "model", f"opset {imp.version} is outside the parser's range {lo}..{hi}"))

    types: dict[str, Any] = {}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        types[vi.name] = vi.type.tensor_type
    for init in model.graph.initializer:
        types.setdefault(init.name, onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)).tensor_type)
    io_names = {v.name for v in [*model.graph.input, *model.graph.output]}
    known = set(TYPE_NAMES.values())
    for name, tt in types.items():
        type_name = _type_name(tt.elem_type) if tt.elem_type else None
        if type_name is None:
            continue
        mapped = TYPE_NAMES.get(type_name)
        if mapped is None or mapped not in known:
            add(Finding("dtype", name, f"data type {type_name} is not a TensorRT type"))
        elif mapped == "UINT8" and name not in io_names:
            add(Finding("dtype", name, "UINT8 is supported only for network inputs and outputs"))
        elif mapped == "DOUBLE":
            add(Finding("dtype", name, "DOUBLE is cast down to FLOAT by TensorRT", "warning"))
        if tt.HasField("shape") and len(tt.shape.dim) > MAX_DIMS:
            add(Finding("shape", name, f"rank {len(tt.shape.dim)} exceeds TensorRT's maximum of {MAX_DIMS} dimensions"))

    for node in model.graph.node:
        where = node.name or f"{node.op_type}({', '.join(node.output)})"
        result.operators[node.op_type] = result.operators.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            add(
                Finding(
                    "operator",
                    where,
                    f"{node.domain}::{node.op_type} is a custom-domain operator: TensorRT needs a plugin for it",
                )
            )
            continue
        entry = ops.get(node.op_type)
        if entry is None or not entry["supported"]:
            add(Finding("operator", where, f"{node.op_type} is not supported by TensorRT's ONNX parser"))
            continue
        if "restrictions" in entry:
            result.notes[node.op_type] = entry["restrictions"]
        first = node.input[0] if node.input else ""
        tt = types.get(first)
        if tt is not None and tt.elem_type and "types" in entry:
            mapped = TYPE_NAMES.get(_type_name(tt.elem_type))
            if mapped is not None and mapped != "DOUBLE" and mapped not in entry["types"]:
                add(
                    Finding(
                        "dtype", where, f"{node.op_type} takes {', '.join(entry['types'])}; input {first} is {mapped}"
                    )
                )
    result.operators = dict(sorted(result.operators.items()))
    return result
