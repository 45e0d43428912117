"""Parity of an export against torch: numbers, not trust.

The runners of exports (ONNX Runtime sessions, reloaded torch programs) are checked here through the one
comparison, `surgery.parity.check`: padded batches of other shapes than the captured one, every output
held to `atol + rtol * max|torch|` over unpadded positions. TensorRT engines are checked in
`exporters/trt_run.py` through the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from runtime.session import CPU, CUDA, has_bf16, ort_session, upcast_bf16  # noqa: F401  (the runtime's)
from surgery.parity import ATOL, RTOL, Parity, check
from surgery.signature import Signature


def feeds(session: Any, signature: Signature, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for the inputs the session declares (an unused input may have been dropped); a bf16 tensor
    (a bf16 causal LM's cache) as fp32 where the session takes fp32 (a bf16 export run as its fp32 copy)."""
    wanted = {i.name: i.type for i in session.get_inputs()}
    return {n: _array(t, wanted[n]) for n, t in zip(signature.names, tensors) if n in wanted}


def _array(t: torch.Tensor, onnx_type: str) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        if onnx_type != "tensor(float)":
            raise TypeError(f"a bfloat16 input for an ONNX Runtime input of type {onnx_type}: numpy has no bfloat16")
        return t.float().numpy()
    return t.numpy()


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
