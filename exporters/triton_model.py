"""What the Python-backend model of a Triton repository (`exporters/triton.py`) runs, inside Triton's stub.

The export copies this file into each model folder (`1/surgery_model.py`, beside `1/model.py`) with the runtime
package it uses (`1/runtime/`), so the folder carries the code it runs and needs nothing of the tool installed:
numpy and onnxruntime only. What would need more is done at export: packs converted to `.onnx_adapter`, a swappable
export's base-only graph (which takes `onnx` to cut out) written as `1/base.onnx`, a bf16 export refused (its CPU
run needs `onnx` to upcast).

Triton's dynamic batcher hands `execute` the requests it merged; each names its adapter as the request parameter
`adapter` or the optional string input `adapter` (none: the base model). `Runner` does the work without Triton,
so it is tested in-process too:

    plain      one ONNX Runtime call per group of requests of one shape; naming an adapter is an error
    routed     one call per shape for all adapters together: row b gets adapter_id[b] (-1: the base model);
               with surgery.group_by_adapter one call per adapter instead (a comparison, not the default)
    swappable  one call per adapter: packs (.onnx_adapter) from the model's adapters/ folder, checked against
               the export (`runtime.check_pack`) and loaded at model load; no adapter runs 1/base.onnx

A request whose adapter is unknown, or whose inputs are malformed, gets its own error; the others are run. If a
merged call fails, each of its requests is run alone, so only the one at fault fails.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Union

import numpy as np

from runtime.errors import SurgeryError
from runtime.packs import (
    ADAPTER_ROOT,
    ORT_TYPES,
    active_adapter,
    as_numpy,
    check_pack,
    dtype_name,
    load_pack,
    write_onnx_adapter,
)
from runtime.slots import SlotsMeta

# exporters/triton.py's names, repeated: this file is copied into the model folder and imports nothing of the
# exporter (tests/exporters/test_triton_model.py checks that they agree)
PARAM = "surgery."  # config.pbtxt parameters: surgery.kind, surgery.adapters, surgery.version, ...
ADAPTER_INPUT = "adapter"
ROUTE_INPUT = "adapter_id"
BASE_FILE = "base.onnx"  # a swappable export's base-only graph, written at export where it can be cut out


def ort_session(path: str | Path, threads: int = 0) -> Any:
    """An ONNX Runtime session on the CPU (`threads` 0: ONNX Runtime's default). Not `runtime.ort_session`, which
    reads the graph with `onnx` to spot a bf16 model: the export refuses those for this backend."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # one warning per adapter slot otherwise; errors reach the caller as exceptions
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Request:
    """One request's inputs by name (each (b, ...)) and its adapter (None: the base model)."""

    inputs: dict[str, np.ndarray]
    adapter: str | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


Result = Union[List[np.ndarray], SurgeryError]  # the outputs, in the model's output order, or what went wrong


class Packs:
    """A swappable export's packs (`.onnx_adapter` files), each checked against the export before ONNX Runtime
    loads it (`runtime.check_pack`: the fingerprint it was made for, tensor names and shapes), each activated by a
    RunOptions of its own."""

    def __init__(self, session: Any, folder: Path):
        self.meta = SlotsMeta.from_metadata(session.get_modelmeta().custom_metadata_map, "model.onnx")
        slots = {s.type for s in session.get_overridable_initializers() if s.name.startswith(ADAPTER_ROOT + ".")}
        self.dtype = ORT_TYPES.get(next(iter(slots), ""), "float32")
        self.folder = folder
        self.options: dict[str, Any] = {}
        self._keep: list[Any] = []  # the LoraAdapter objects the RunOptions point to

    def load(self, name: str, path: Path) -> None:
        pack = load_pack(path)
        check_pack(pack, self.meta.fingerprint, self.meta.widths, name=f"pack {path.name}")
        if {dtype_name(t) for t in pack.tensors.values()} != {self.dtype}:  # in the slots' dtype, once, at load
            tensors = {n: as_numpy(t, self.dtype) for n, t in pack.tensors.items()}
            path = write_onnx_adapter(tensors, pack.fingerprint, self.folder / f"{len(self._keep)}.onnx_adapter")
        adapter, options = active_adapter(path)
        self._keep.append(adapter)
        self.options[name] = options


class Runner:
    """The model of one Triton model folder: `folder/<version>/model.onnx`, its config parameters and packs."""

    def __init__(self, folder: str | Path, version: str, params: dict[str, str]):
        folder = Path(folder)
        self.kind = params.get(PARAM + "kind", "plain")
        threads = int(params.get(PARAM + "threads", "0"))
        self.group = self.kind == "swappable" or params.get(PARAM + "group_by_adapter") == "true"
        self.ort = ort_session(folder / version / "model.onnx", threads)
        self.base = self.ort
        self.adapters: list[str] = []
        self.packs: Packs | None = None
        if self.kind == "swappable":
            self._tmp = tempfile.TemporaryDirectory(prefix="surgery-packs-")  # packs cast to the slots' dtype
            self.packs = Packs(self.ort, Path(self._tmp.name))
            for pack in sorted(p for p in (folder / "adapters").glob("*") if not p.name.startswith(".")):
                if pack.suffix != ".onnx_adapter":
                    raise SurgeryError(
                        f"adapters/{pack.name}: this model reads .onnx_adapter packs only (numpy and onnxruntime "
                        f"are all it has); convert it: surgery pack {pack.name} -o {pack.stem}.onnx_adapter"
                    )
                self.packs.load(pack.stem, pack)  # a bad pack fails the load, naming it
            self.adapters = list(self.packs.options)
            if (folder / version / BASE_FILE).is_file():
                self.base = ort_session(folder / version / BASE_FILE, threads)
        elif self.kind == "routed":
            self.adapters = json.loads(params[PARAM + "adapters"])
        self.inputs = [
            i.name for i in self.ort.get_inputs() if i.name != ROUTE_INPUT and not i.name.startswith(ADAPTER_ROOT + ".")
        ]
        self.ids = {name: i for i, name in enumerate(self.adapters)}

    def check(self, request: Request) -> SurgeryError | None:
        """What is wrong with a request before it joins a batch, or None."""
        missing = [n for n in self.inputs if n not in request.inputs]
        if missing:
            return SurgeryError(f"missing input {missing[0]!r}; this model takes {', '.join(self.inputs)}")
        if request.adapter is not None and request.adapter not in self.ids:
            if self.kind == "plain":
                return SurgeryError(
                    f"adapter {request.adapter!r} asked of a model without adapters; "
                    "serve a --swappable or --route export to choose adapters per request"
                )
            return SurgeryError(
                f"unknown adapter {request.adapter!r}; this model serves {', '.join(self.adapters) or 'none'} "
                "(or none, for the base model)"
            )
        return None

    def _run(self, requests: list[Request]) -> list[list[np.ndarray]]:
        """One ONNX Runtime call for requests of one shape (and, where grouped, one adapter); outputs per request."""
        feeds = {n: np.concatenate([r.inputs[n] for r in requests]) for n in self.inputs}
        session, options = self.ort, None
        if self.kind == "routed":
            ids = [self.ids.get(r.adapter, -1) if r.adapter is not None else -1 for r in requests]
            feeds[ROUTE_INPUT] = np.repeat(np.array(ids, dtype=np.int64), [r.rows for r in requests])
        elif self.packs is not None:
            adapter = requests[0].adapter
            session, options = (self.base, None) if adapter is None else (self.ort, self.packs.options[adapter])
        outputs = session.run(None, feeds, options)
        ends = np.cumsum([r.rows for r in requests])[:-1]
        per_output = [np.split(o, ends) for o in outputs]
        return [[o[i] for o in per_output] for i in range(len(requests))]

    def run(self, requests: list[Request]) -> list[Result]:
        """Outputs (or an error) for each request, in order; requests that can be are run together."""
        results: list[Result | None] = [None] * len(requests)
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            error = self.check(r)
            if error is not None:
                results[i] = error
                continue
            key = tuple((n, r.inputs[n].shape[1:], r.inputs[n].dtype.str) for n in self.inputs)
            groups.setdefault(key + ((r.adapter,) if self.group else ()), []).append(i)
        for members in groups.values():
            try:
                for i, out in zip(members, self._run([requests[i] for i in members])):
                    results[i] = out
            except Exception:  # noqa: BLE001  one bad request must not fail the batch: run each alone
                for i in members:
                    try:
                        results[i] = self._run([requests[i]])[0]
                    except Exception as exc:  # noqa: BLE001  ONNX Runtime's message, for this request only
                        results[i] = SurgeryError(f"inference failed: {type(exc).__name__}: {exc}")
        return results  # type: ignore[return-value]


def adapter_of(parameters: str | None, adapter_input: np.ndarray | None) -> str | None:
    """The adapter a request names: the string input `adapter` (one value for all its rows) or the request
    parameter `adapter`; both must agree where both are given. Empty means none (the base model)."""
    names = set()
    if adapter_input is not None:
        values = {v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(adapter_input).reshape(-1)}
        if len(values) > 1:
            raise SurgeryError(f"one adapter per request; its rows name {sorted(values)}: send one request each")
        names |= values
    if parameters:
        value = json.loads(parameters).get(ADAPTER_INPUT)
        if value is not None:
            names.add(str(value))
    if len(names) > 1:
        raise SurgeryError(f"the adapter input and the adapter parameter disagree: {sorted(names)}")
    name = names.pop() if names else ""
    return name or None


class TritonPythonModel:
    """The entry point Triton's Python backend looks for (model.py checks the packages, then hands over to it)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.runner = Runner(args["model_repository"], args["model_version"], params)
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        parsed: list[Request | SurgeryError] = []
        for r in requests:
            try:
                inputs = {}
                for name in self.runner.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(r, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                adapter_tensor = pb_utils.get_input_tensor_by_name(r, ADAPTER_INPUT)
                adapter_values = adapter_tensor.as_numpy() if adapter_tensor is not None else None
                parsed.append(Request(inputs, adapter_of(r.parameters(), adapter_values)))
            except (SurgeryError, ValueError) as exc:
                parsed.append(SurgeryError(str(exc)))
        valid = [p for p in parsed if isinstance(p, Request)]
        results = iter(self.runner.run(valid))
        responses = []
        for p in parsed:
            result = p if isinstance(p, SurgeryError) else next(results)
            if isinstance(result, SurgeryError):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
            else:
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in zip(self.outputs, result)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
