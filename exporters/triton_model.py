"""What the Python-backend model of a Triton repository (`exporters/triton.py`) runs, inside Triton's stub.

Triton's dynamic batcher hands `execute` the requests it merged; each names its adapter as the request parameter
`adapter` or the optional string input `adapter` (none: the base model). `Runner` does the work without Triton,
so it is tested in-process too:

    plain      one ONNX Runtime call per group of requests of one shape; naming an adapter is an error
    routed     one call per shape for all adapters together: row b gets adapter_id[b] (-1: the base model);
               with surgery.group_by_adapter one call per adapter instead (a comparison, not the default)
    swappable  one call per adapter (AdaptedSession, packs from the model's adapters/ folder, loaded at load)

A request whose adapter is unknown, or whose inputs are malformed, gets its own error; the others are run. If a
merged call fails, each of its requests is run alone, so only the one at fault fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters.verify import ort_session
from surgery.errors import SurgeryError

PARAM = "surgery."  # duplicates exporters/triton.py's names to keep this import light inside the stub
ADAPTER_INPUT = "adapter"
ROUTE_INPUT = "adapter_id"
PACK_SUFFIXES = (".onnx_adapter", ".safetensors")


@dataclass
class Request:
    """One request's inputs by name (each (b, ...)) and its adapter (None: the base model)."""

    inputs: dict[str, np.ndarray]
    adapter: str | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


Result = list[np.ndarray] | SurgeryError  # the outputs, in the model's output order, or what went wrong


class Runner:
    """The model of one Triton model folder: `folder/<version>/model.onnx`, its config parameters and packs."""

    def __init__(self, folder: str | Path, version: str, params: dict[str, str]):
        folder = Path(folder)
        self.kind = params.get(PARAM + "kind", "plain")
        threads = int(params.get(PARAM + "threads", "0"))
        onnx_path = folder / version / "model.onnx"
        self.group = self.kind == "swappable" or params.get(PARAM + "group_by_adapter") == "true"
        self.adapters: list[str] = []
        if self.kind == "swappable":
            from exporters.runtime import AdaptedSession

            self.session = AdaptedSession(onnx_path, threads=threads)
            packs = sorted(p for p in (folder / "adapters").glob("*") if p.suffix in PACK_SUFFIXES)
            for pack in packs:
                self.session.load(pack.stem, pack)  # a bad pack fails the load, naming it
            self.adapters = self.session.adapters
            self.ort = self.session.session
        else:
            self.ort = ort_session(onnx_path, threads=threads)
            if self.kind == "routed":
                self.adapters = json.loads(params[PARAM + "adapters"])
        self.inputs = [
            i.name for i in self.ort.get_inputs() if i.name != ROUTE_INPUT and not i.name.startswith("adapters.")
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
        options = None
        if self.kind == "routed":
            ids = [self.ids.get(r.adapter, -1) if r.adapter is not None else -1 for r in requests]
            feeds[ROUTE_INPUT] = np.repeat(np.array(ids, dtype=np.int64), [r.rows for r in requests])
        elif self.kind == "swappable":
            options = self.session.run_options(requests[0].adapter)
        outputs = self.ort.run(None, feeds, options)
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
    """The entry point Triton's Python backend looks for (re-exported by the repository's model.py)."""

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
