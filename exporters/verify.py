"""Parity of an export against torch: numbers, not trust.

The check runs ONNX Runtime on batches of other shapes than the captured one, padded where the model
takes an attention mask, and compares every output with torch under an explicit absolute tolerance.
Positions that padding hides (mask 0) are left out: what a model computes there is unspecified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from surgery.signature import Signature

# Test shapes by axis name: an odd padded batch, then one row of the benchmark length.
CHECK_SIZES = ({"batch": 3, "seq": 37}, {"batch": 1, "seq": 128})
OTHER_AXIS = (5, 9)  # sizes for axes of other names, in the same two checks


@dataclass(frozen=True)
class Parity:
    """Largest absolute difference over all checked outputs and shapes, and where it was."""

    max_abs_diff: float
    tolerance: float
    shapes: list[dict[str, int]]
    worst: str = ""
    per_output: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "parity_ok": self.ok,
            "checked_shapes": self.shapes,
            "per_output": self.per_output,
        }


CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")  # ops without a CUDA kernel fall back to the CPU


def ort_session(path: str | Path, threads: int = 2, spinning: bool = True, providers: tuple[str, ...] = CPU) -> Any:
    """An ONNX Runtime session (CPU unless `providers` says otherwise) with a fixed thread count (and, for
    alternated timing, no spinning)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def check_sizes(signature: Signature) -> list[dict[str, int]]:
    """Two test shapes within each axis's range, both unlike the captured example where the range allows."""
    sizes = []
    for k, preset in enumerate(CHECK_SIZES):
        chosen = {}
        for axis in signature.axes().values():
            want = preset.get(axis.name, OTHER_AXIS[k])
            chosen[axis.name] = min(max(want, axis.min), axis.max)
        sizes.append(chosen)
    return sizes


def feeds(session: Any, signature: Signature, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for the inputs the session declares (an unused input may have been dropped)."""
    wanted = {i.name for i in session.get_inputs()}
    return {n: t.numpy() for n, t in zip(signature.names, tensors) if n in wanted}


def compare_outputs(
    names: list[str], got: list[np.ndarray], expected: list[torch.Tensor], mask: np.ndarray | None
) -> dict[str, float]:
    """Max |got - expected| per output; where `mask` (B, S) is given, over its unpadded positions only."""
    assert len(got) == len(expected), f"ONNX has {len(got)} outputs, torch {len(expected)}"
    diffs = {}
    for name, want, have in zip(names, expected, got):
        want = want.detach().float().numpy()
        have = np.asarray(have, dtype=np.float32)
        if want.shape != have.shape:
            diffs[name] = float("inf")
            continue
        err = np.abs(want - have)
        if mask is not None and err.ndim >= 2 and err.shape[:2] == mask.shape:
            err = err[mask]  # unpadded positions only
        diffs[name] = float(err.max()) if err.size else 0.0
    return diffs


def mask_of(signature: Signature, tensors: list[torch.Tensor]) -> np.ndarray | None:
    for name, t in zip(signature.names, tensors):
        if name == "attention_mask" and t.dim() == 2:
            return t.numpy().astype(bool)
    return None


def check_onnx(
    path: str | Path, module: Any, signature: Signature, tolerance: float = 1e-4, sizes: list[dict[str, int]] | None = None
) -> Parity:
    """Compare an ONNX model with the torch module on padded batches of other shapes."""
    return check_session(ort_session(path), module, signature, tolerance, sizes)


def check_session(
    session: Any,
    module: Any,
    signature: Signature,
    tolerance: float = 1e-4,
    sizes: list[dict[str, int]] | None = None,
    run_options: Any = None,
) -> Parity:
    """`check_onnx` on a live session, with `run_options` (an active adapter, say)."""
    names = [o.name for o in session.get_outputs()]
    return check_runner(lambda t: (names, session.run(None, feeds(session, signature, t), run_options)), module, signature, tolerance, sizes)


def check_program(program: Any, module: Any, signature: Signature, tolerance: float = 1e-4) -> Parity:
    """Compare another torch module (a saved and reloaded program, say) with `module`, as `check_onnx` does ORT."""
    names = list(signature.outputs)

    def run(tensors: list[torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
        with torch.no_grad():
            got = [t.numpy() for t in pytree.tree_leaves(signature.call(program, tensors))]
        return names or [f"output {i}" for i in range(len(got))], got

    return check_runner(run, module, signature, tolerance)


def check_runner(
    run: Callable[[list[torch.Tensor]], tuple[list[str], list[np.ndarray]]],
    module: Any,
    signature: Signature,
    tolerance: float,
    sizes: list[dict[str, int]] | None = None,
) -> Parity:
    """`run` (input tensors -> output names and arrays) against the torch module, per output, on padded batches of
    `sizes` (default: `check_sizes`), seeds 1, 2, ...; the worst difference and where it was."""
    sizes = sizes or check_sizes(signature)
    worst, worst_at, per_output = 0.0, "", {}
    for k, s in enumerate(sizes):
        tensors = signature.examples(s, seed=k + 1, pad=True)
        with torch.no_grad():
            expected = pytree.tree_leaves(signature.call(module, tensors))
        names, got = run(tensors)
        for name, d in compare_outputs(names, got, expected, mask_of(signature, tensors)).items():
            per_output[name] = max(per_output.get(name, 0.0), d)
            if d >= worst:
                worst, worst_at = d, f"output {name}, shape {s}"
    return Parity(max_abs_diff=worst, tolerance=tolerance, shapes=sizes, worst=worst_at, per_output=per_output)


# Largest |engine - torch| accepted, by engine precision. fp32 engines are built with TF32 off, yet GPU kernels
# order their reductions differently from torch on the CPU (ONNX Runtime on the CPU measures about 3e-6 on MiniLM);
# fp16 keeps 10 mantissa bits (unit roundoff 4.9e-4) and bf16 7 (3.9e-3), compounded over the layers.
# These are starting points: they have not yet been measured against a real engine.
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1}


def check_engine(
    engine: str | Path, module: Any, signature: Signature, precision: str, sizes: list[dict[str, int]] | None = None
) -> Parity:
    """Run a TensorRT engine (Polygraphy's TrtRunner) on padded batches and compare with torch per output."""
    from exporters.tensorrt import engine_runner

    def run(tensors: list[torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
        wanted = set(runner.get_input_metadata().keys())  # an unused input may have been dropped
        got = runner.infer(feed_dict={n: t.numpy() for n, t in zip(signature.names, tensors) if n in wanted})
        return list(got), [np.asarray(v) for v in got.values()]

    with engine_runner(engine) as runner:
        return check_runner(run, module, signature, ENGINE_TOLERANCE[precision], sizes)
