"""Parity of an export against torch: numbers, not trust.

The runners of exports (ONNX Runtime sessions, reloaded torch programs) are checked here through the one
comparison, `surgery.parity.check`: padded batches of other shapes than the captured one, every output
held to `atol + rtol * max|torch|` over unpadded positions. TensorRT engines are checked in
`exporters/tensorrt.py` through the same function.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from surgery.parity import ATOL, RTOL, Parity, check
from surgery.signature import Signature

CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")  # ops without a CUDA kernel fall back to the CPU


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
    in fp32. Its tensors go to `out`.data, so a model past 2 GB is copied too.
    """
    import onnx
    from onnx import numpy_helper

    from exporters.onnx_files import save_onnx

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
    save_onnx(model, out, external=True)
    return Path(out)


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


def feeds(session: Any, signature: Signature, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for the inputs the session declares (an unused input may have been dropped)."""
    wanted = {i.name for i in session.get_inputs()}
    return {n: t.numpy() for n, t in zip(signature.names, tensors) if n in wanted}


def check_onnx(
    path: str | Path,
    module: Any,
    signature: Signature,
    tolerance: float = ATOL,
    sizes: list[dict[str, int]] | None = None,
    rtol: float = RTOL,
) -> Parity:
    """Compare an ONNX model with the torch module on padded batches of other shapes."""
    return check_session(ort_session(path), module, signature, tolerance, sizes, rtol=rtol)


def check_session(
    session: Any,
    module: Any,
    signature: Signature,
    tolerance: float = ATOL,
    sizes: list[dict[str, int]] | None = None,
    run_options: Any = None,
    rtol: float = RTOL,
) -> Parity:
    """`check_onnx` on a live session, with `run_options` (an active adapter, say)."""
    names = [o.name for o in session.get_outputs()]

    def run(tensors: list[torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
        return names, session.run(None, feeds(session, signature, tensors), run_options)

    return check(run, module, signature, atol=tolerance, rtol=rtol, sizes=sizes)


def check_program(
    program: Any, module: Any, signature: Signature, tolerance: float = ATOL, rtol: float = RTOL
) -> Parity:
    """Compare another torch module (a saved and reloaded program, say) with `module`, as `check_onnx` does ORT."""
    names = list(signature.outputs)

    def run(tensors: list[torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
        with torch.no_grad():
            got = [t.numpy() for t in pytree.tree_leaves(signature.call(program, tensors))]
        return names or [f"output {i}" for i in range(len(got))], got

    return check(run, module, signature, atol=tolerance, rtol=rtol)
