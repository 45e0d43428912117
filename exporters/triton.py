"""A Triton Inference Server model repository for an exported model: `config.pbtxt` + `1/model.plan|onnx`.

    DIR/NAME/config.pbtxt
    DIR/NAME/1/model.onnx        (platform onnxruntime_onnx)   or   1/model.plan (platform tensorrt_plan);
                                 a routed export's takes `adapter_id` per request row, batched by Triton
    DIR/NAME-python/config.pbtxt (backend python: the project's runtime on ONNX Runtime, `exporters/triton_model.py`)
    DIR/NAME-python/1/model.py, 1/surgery_model.py, 1/runtime/, 1/model.onnx (+ 1/base.onnx: a swappable base graph)
    DIR/NAME-python/adapters/    (swappable: the packs it serves, .onnx_adapter, loaded at model load)

A Python-backend model folder is self-contained: 1/surgery_model.py is a copy of `exporters/triton_model.py`, and
1/runtime/ of the torch-free runtime package it imports; they need numpy and onnxruntime only. `surgery.version` in
its config.pbtxt names the tool version that wrote it.
Give the backend those two packages with the model parameter EXECUTION_ENV_PATH (`execution_env`) or a server
image that has them; model.py names the missing one when the model fails to load.

The Python-backend model takes the ONNX inputs plus an optional string input `adapter` (or the request parameter
`adapter`) and, with Triton's dynamic batcher, runs the requests of one batch together: for a routed export the
requests of different adapters in one ONNX Runtime call (`adapter_id` per row), for a swappable export one call
per adapter. It is written for plain, swappable and routed ONNX exports; `exporters/triton_server.py` starts the
server bundled in the `nvidia-pytriton` wheel on it.

Inputs and outputs, their data types and dims come from the ONNX graph the model was exported as (a dynamic
dimension is -1). When every input and output starts with the dynamic `batch` axis, Triton batches:
`max_batch_size` is that axis's maximum (the engine profile's, for a plan) and dims leave the batch out.
Model configuration reference: https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/model_configuration.html
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

import runtime

from surgery.errors import SurgeryError
from surgery.packs import Pack, save_pack
from runtime.files import check_name, check_onnx_data, external_locations
from surgery.sites import ADAPTER_ROOT
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
KINDS = ("plain", "swappable", "routed")  # the ONNX exports the Python-backend model serves
PYTHON_SUFFIX = "-python"
ADAPTER_INPUT = "adapter"  # the optional string input that names a request's adapter (or the request parameter)
ROUTE_INPUT = "adapter_id"  # the routed export's per-row input, fed by the Python model, not by the client
PARAM = "surgery."  # config.pbtxt parameters read by exporters/triton_model.py: surgery.kind, surgery.adapters, ...
MODEL_PY = '''"""Triton Python-backend model written by surgery {version} (`surgery export --triton-repo`).

The code it runs is beside this file, copied at export: surgery_model.py (the tool's exporters/triton_model.py) and
the runtime/ package it imports. It needs the Python packages numpy and onnxruntime in the backend's environment and
nothing of the tool: name an environment that has them with the model parameter EXECUTION_ENV_PATH, or install them
in the server's image."""

import importlib.util
import sys
from pathlib import Path

SURGERY_VERSION = "{version}"
NEEDS = ("numpy", "onnxruntime")


class TritonPythonModel:
    def initialize(self, args):
        missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                f"model {{args['model_name']}} (written by surgery {{SURGERY_VERSION}}) needs the Python package(s) "
                f"{{', '.join(missing)}}, missing from the Triton Python backend's environment (Python "
                f"{{sys.version.split()[0]}}, {{sys.prefix}}); install numpy and onnxruntime there, or name an "
                "environment that has them with the model parameter EXECUTION_ENV_PATH"
            )
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from surgery_model import TritonPythonModel as Model

        self.model = Model()
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)
'''
RUNTIME_FILE = Path(__file__).with_name("triton_model.py")  # copied into each model folder as 1/surgery_model.py
RUNTIME_PACKAGE = Path(runtime.__file__).parent  # and the runtime package it imports, as 1/runtime/
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


Tensors = list[tuple[str, str, list[int | str]]]


def _block(
    kind: str,
    items: Tensors,
    batched: bool,
    optional: frozenset[str] = frozenset(),
    reshape: frozenset[str] = frozenset(),
) -> str:
    """A config's input or output list. A name in `reshape` is a (batch,) tensor: Triton's dims cannot be empty
    past the batch axis, so it is dims [1] reshaped to [] (the model sees (batch,))."""
    entries = []
    for name, dtype, dims in items:
        shown = [d if isinstance(d, int) else -1 for d in (dims[1:] if batched else dims)]
        extra = "\n    optional: true" if name in optional else ""
        if name in reshape:
            assert batched and shown == [], (name, dims)
            shown, extra = [1], extra + "\n    reshape: { shape: [ ] }"
        entries.append(
            f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, shown))} ]{extra}\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _io(onnx_path: str | Path, signature: Signature) -> tuple[list, list, bool]:
    """The ONNX model's client-facing inputs (adapter slots and `adapter_id` left out), outputs, and whether
    every one starts with the dynamic batch axis (then Triton batches)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    hidden = lambda n: n in inits or n == ROUTE_INPUT or n.startswith(ADAPTER_ROOT + ".")  # noqa: E731
    inputs = _tensors([i for i in graph.input if not hidden(i.name)])
    outputs = _tensors(list(graph.output))
    batch_axes = {s.axes[0].name for s in signature.inputs if 0 in s.axes}
    batched = batch_axes == {BATCH} and all(dims and dims[0] == BATCH for _, _, dims in inputs + outputs)
    return inputs, outputs, batched


def write_triton_repo(
    repo: str | Path,
    model_file: str | Path,
    onnx_path: str | Path,
    signature: Signature,
    name: str,
    max_batch: int | None = None,
    adapters: list[str] | None = None,
) -> TritonRepo:
    """Write DIR/NAME/config.pbtxt and copy `model_file` (.onnx or .plan) to DIR/NAME/1/; `onnx_path` gives the I/O.

    `adapters` (a routed export's names, by id) makes it the routed model on Triton's own ONNX Runtime backend:
    `adapter_id` is an ordinary batched input (dims [1], reshaped to the graph's (batch,)), the dynamic batcher
    merges requests of any adapters into one call, and the names go to the parameter `surgery.adapters`. An id
    out of range runs the base model (the graph clamps it), so one bad id never fails a batch."""
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
    inputs, outputs, batched = _io(onnx_path, signature)
    axis_max = signature.axes()[BATCH].max if batched else 0
    max_batch_size = min(max_batch or axis_max, axis_max) if batched else 0
    platform, filename = PLATFORMS[model_file.suffix]
    tail = ""
    if adapters is not None:
        route = _route_input(onnx_path)
        if not batched or route is None:
            raise SurgeryError(
                f"{onnx_path}: not a routed export with a batch axis (no (batch,) input {ROUTE_INPUT!r}); "
                "export with --route"
            )
        inputs = inputs + [route]
        tail = "instance_group [ { kind: KIND_CPU count: 1 } ]\ndynamic_batching { }\n" + _parameters(
            {PARAM + "adapters": json.dumps(adapters)}
        )
    text = (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
        + _block("input", inputs, batched, reshape=frozenset({ROUTE_INPUT}) if adapters is not None else frozenset())
        + _block("output", outputs, batched)
        + tail
    )
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    for location in data:  # the model reads it by the name it was written with, relative to its folder
        (folder / "1" / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file.parent / location, folder / "1" / location)
    shutil.copyfile(model_file, folder / "1" / filename)
    (folder / "config.pbtxt").write_text(text)
    return TritonRepo(folder, folder / "config.pbtxt", folder / "1" / filename, max_batch_size)


def _route_input(onnx_path: str | Path) -> tuple[str, str, list[int | str]] | None:
    """The routed export's `adapter_id` input as (name, Triton type, dims), if it has one of shape (batch,)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    found = [t for t in _tensors([i for i in graph.input if i.name == ROUTE_INPUT])]
    if not found or found[0][2] != [BATCH]:
        return None
    return found[0]


def _parameters(params: dict[str, str]) -> str:
    entry = "parameters: {{ key: {} value: {{ string_value: {} }} }}\n"
    return "".join(entry.format(json.dumps(k), json.dumps(v)) for k, v in params.items())


def write_python_model(
    repo: str | Path,
    onnx_path: str | Path,
    signature: Signature,
    name: str,
    kind: str,
    adapters: list[str] | None = None,
    packs: dict[str, Pack] | None = None,
    max_batch: int | None = None,
    threads: int = 0,
    group_by_adapter: bool = False,
    execution_env: str | None = None,
) -> TritonRepo:
    """Write DIR/NAME-python: a Python-backend model that serves `onnx_path` (a plain, swappable or routed export)
    with exporters/triton_model.py, dynamic batching on. `adapters`: a routed export's adapter names, by
    adapter_id; `packs`: packs written to its adapters/ folder (swappable); `group_by_adapter`: run the requests
    of a routed batch one adapter at a time (for comparison; the default runs them together); `execution_env`:
    the model parameter EXECUTION_ENV_PATH, the Python environment (a folder or a conda-pack archive; may start
    with `$$TRITON_MODEL_DIRECTORY`) the backend runs the model in. Written to a temporary folder beside it and
    renamed: an existing model of that name is replaced whole."""
    from surgery import __version__
    from exporters.verify import has_bf16

    if has_bf16(onnx_path):
        raise SurgeryError(
            f"{onnx_path}: a bf16 model's Python-backend model would need the tool to upcast it on the CPU; "
            "export it in fp32 or fp16 for Triton"
        )
    if kind not in KINDS:
        raise SurgeryError(f"unknown Python-backend model kind {kind!r}; one of {', '.join(KINDS)}")
    name = check_name(name + PYTHON_SUFFIX, "Triton model name")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise SurgeryError(f"--triton-repo {repo}: exists and is not a folder")
    inputs, outputs, batched = _io(onnx_path, signature)
    if not batched:
        raise SurgeryError(
            f"{onnx_path}: the Python-backend model batches requests, so every input and output must start with "
            "the dynamic batch axis; this model's do not"
        )
    for reserved in (ADAPTER_INPUT,):
        if any(n == reserved for n, _, _ in inputs + outputs):
            raise SurgeryError(f"{onnx_path}: has a tensor named {reserved!r}, the name of the adapter input")
    if kind == "routed" and (not adapters or len(set(adapters)) != len(adapters)):
        raise SurgeryError(f"a routed model needs distinct adapter names, one per adapter_id; got {adapters}")
    for a in adapters or []:
        check_name(a, "adapter name")
    axis_max = signature.axes()[BATCH].max
    max_batch_size = min(max_batch or axis_max, axis_max)
    params = {PARAM + "kind": kind, PARAM + "threads": str(threads), PARAM + "version": __version__}
    if execution_env:
        params["EXECUTION_ENV_PATH"] = execution_env
    if kind == "routed":
        params[PARAM + "adapters"] = json.dumps(adapters)
        params[PARAM + "group_by_adapter"] = str(group_by_adapter).lower()
    text = (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        + _block("input", inputs + [(ADAPTER_INPUT, "TYPE_STRING", [BATCH, 1])], True, frozenset({ADAPTER_INPUT}))
        + _block("output", outputs, True)
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        + "dynamic_batching { }\n"
        + _parameters(params)
    )
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=repo))
    try:
        tmp.chmod(0o755)
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_path, tmp / "1" / "model.onnx")
        check_onnx_data(Path(onnx_path))
        for location in external_locations(Path(onnx_path)):  # the data file, under the name the model reads
            shutil.copyfile(Path(onnx_path).parent / location, tmp / "1" / location)
        (tmp / "1" / "model.py").write_text(MODEL_PY.format(version=__version__))
        shutil.copyfile(RUNTIME_FILE, tmp / "1" / "surgery_model.py")
        shutil.copytree(RUNTIME_PACKAGE, tmp / "1" / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
        if kind == "swappable":
            _base_graph(Path(onnx_path), tmp / "1" / "base.onnx")
            (tmp / "adapters").mkdir()
            for pack_name, pack in (packs or {}).items():
                save_pack(pack, tmp / "adapters" / f"{check_name(pack_name, 'pack name')}.onnx_adapter")
        (tmp / "config.pbtxt").write_text(text)
        folder = repo / name
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=repo))
            os.replace(folder, old / name)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TritonRepo(folder, folder / "config.pbtxt", folder / "1" / "model.onnx", max_batch_size)


def _base_graph(onnx_path: Path, out: Path) -> None:
    """A swappable export's base-only graph (`exporters/slots.base_only`) at `out`, so the model with no pack runs
    without the empty slots; nothing where it cannot be cut out or the weights are external (one copy only)."""
    from exporters.slots import SwappableMeta, base_only

    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return
    meta = SwappableMeta.from_metadata({p.key: p.value for p in model.metadata_props}, str(onnx_path))
    base = base_only(model, meta.widths)
    if base is not None:
        onnx.save(base, str(out))
