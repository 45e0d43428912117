"""A Triton Inference Server model repository for an exported model: `config.pbtxt` + `1/model.plan|onnx`.

    DIR/NAME/config.pbtxt
    DIR/NAME/1/model.onnx        (platform onnxruntime_onnx)   or   1/model.plan (platform tensorrt_plan)

Inputs and outputs, their data types and dims come from the ONNX graph the model was exported as (a dynamic
dimension is -1). When every input and output starts with the dynamic `batch` axis, Triton batches:
`max_batch_size` is that axis's maximum (the engine profile's, for a plan) and dims leave the batch out.
Model configuration reference: https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/model_configuration.html
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from surgery.errors import SurgeryError
from surgery.safe_files import check_name, check_onnx_data, external_locations
from surgery.signature import BATCH, Signature

# ONNX element type -> Triton data type
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "INT8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
}
PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan")}


@dataclass(frozen=True)
class TritonRepo:
    folder: Path  # DIR/NAME
    config: Path
    model: Path
    max_batch_size: int


def _tensors(values: list[onnx.ValueInfoProto]) -> list[tuple[str, str, list[int | str]]]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(tt.elem_type)
        if type_name not in TRITON_TYPES:
            raise SurgeryError(f"tensor {v.name} is {type_name}, which Triton's config has no type for")
        dims: list[int | str] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tt.shape.dim]
        out.append((v.name, TRITON_TYPES[type_name], dims))
    return out


def _block(kind: str, items: list[tuple[str, str, list[int | str]]], batched: bool) -> str:
    entries = []
    for name, dtype, dims in items:
        shown = [d if isinstance(d, int) else -1 for d in (dims[1:] if batched else dims)]
        entries.append(
            f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, shown))} ]\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def write_triton_repo(
    repo: str | Path,
    model_file: str | Path,
    onnx_path: str | Path,
    signature: Signature,
    name: str,
    max_batch: int | None = None,
) -> TritonRepo:
    """Write DIR/NAME/config.pbtxt and copy `model_file` (.onnx or .plan) to DIR/NAME/1/; `onnx_path` gives the I/O."""
    check_name(name, "Triton model name")
    model_file = Path(model_file)
    if model_file.suffix not in PLATFORMS:
        raise SurgeryError(f"--triton-repo takes a .onnx or .plan model, not {model_file.name}")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise SurgeryError(f"--triton-repo {repo}: exists and is not a folder")
    data: list[str] = []
    if model_file.suffix == ".onnx":
        check_onnx_data(model_file)  # its external data lies beside it; it travels with it, under its own name
        data = external_locations(model_file)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = _tensors([i for i in graph.input if i.name not in inits])
    outputs = _tensors(list(graph.output))
    batch_axes = {s.axes[0].name for s in signature.inputs if 0 in s.axes}
    batched = batch_axes == {BATCH} and all(dims and dims[0] == BATCH for _, _, dims in inputs + outputs)
    axis_max = signature.axes()[BATCH].max if batched else 0
    max_batch_size = min(max_batch or axis_max, axis_max) if batched else 0
    platform, filename = PLATFORMS[model_file.suffix]
    text = (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
        + _block("input", inputs, batched)
        + _block("output", outputs, batched)
    )
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    for location in data:  # the model reads it by the name it was written with, relative to its folder
        (folder / "1" / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file.parent / location, folder / "1" / location)
    shutil.copyfile(model_file, folder / "1" / filename)
    (folder / "config.pbtxt").write_text(text)
    return TritonRepo(folder, folder / "config.pbtxt", folder / "1" / filename, max_batch_size)
