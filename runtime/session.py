"""ONNX Runtime sessions as the tool makes them: a fixed thread count, quiet logs, a bf16 model on the CPU run as
its fp32 copy. `session_device` says where a session keeps its tensors (for IO binding)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")  # ops without a CUDA kernel fall back to the CPU
DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}  # ORT's device type per provider


def has_bf16(path: str | Path) -> bool:
    """Whether an ONNX model takes, holds or returns bfloat16 tensors (its graph only; no data is read)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    bf16 = onnx.TensorProto.BFLOAT16
    values = [*graph.input, *graph.output]
    return any(v.type.tensor_type.elem_type == bf16 for v in values) or any(
        i.data_type == bf16 for i in graph.initializer
    )


def upcast_bf16(path: str | Path, out: str | Path) -> Path:
    """A copy of the model at `out` with every bfloat16 tensor, type and cast made float32.

    ONNX Runtime's CPU provider has no bfloat16 kernels for most ops (Mul, MatMul ...: NOT_IMPLEMENTED), so on
    a CPU a bf16 export runs as this copy: the same graph and the same weights (bf16 -> fp32 is exact), computed
    in fp32. Its tensors go to `out`.data, so a model past 2 GB is copied too. `out` is a scratch path (the
    caller's temporary folder): it is written in place.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT

    def tensor(t: Any) -> None:
        if t.data_type == bf16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def nodes(items: Any) -> None:
        for node in items:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == bf16:
                    attr.i = f32
                if attr.HasField("t"):
                    tensor(attr.t)
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    graph(g)

    def graph(g: Any) -> None:
        for init in g.initializer:
            tensor(init)
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.tensor_type.elem_type == bf16:
                v.type.tensor_type.elem_type = f32
        nodes(g.node)

    graph(model.graph)
    for function in model.functions:
        nodes(function.node)
    out = Path(out)
    onnx.save_model(
        model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data"
    )
    return out


def ort_session(
    path: str | Path | bytes, threads: int = 2, spinning: bool = True, providers: tuple[str, ...] = CPU
) -> Any:
    """An ONNX Runtime session of a model file (or a serialized model) on the CPU unless `providers` says otherwise,
    with a fixed thread count (and, for alternated timing, no spinning). A bf16 model file on the CPU alone runs as
    its fp32 copy (`upcast_bf16`)."""

    if not isinstance(path, bytes) and tuple(providers) == CPU and has_bf16(path):
        with tempfile.TemporaryDirectory(prefix="surgery-fp32-") as folder:
            # ORT reads the data file while it builds the session: the copy can go once it is built
            return _session(upcast_bf16(path, Path(folder) / "fp32.onnx"), threads, spinning, providers)
    return _session(path, threads, spinning, providers)


def _session(path: str | Path | bytes, threads: int, spinning: bool, providers: tuple[str, ...]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # errors reach the caller as exceptions; ORT would also log them
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=list(providers))


def session_device(session: Any) -> tuple[str, int]:
    """(device type, id) where a session's first provider keeps its tensors: ("cuda", 0), or ("cpu", 0)."""
    provider = session.get_providers()[0]
    kind = DEVICES.get(provider, "cpu")
    if kind == "cpu":
        return "cpu", 0
    return kind, int(session.get_provider_options().get(provider, {}).get("device_id", 0))
