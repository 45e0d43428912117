"""Running a TensorRT engine: Polygraphy's `TrtRunner` in the profile that takes the inputs, and the parity check of
an engine against torch (`check_engine`, through the one comparison of `surgery.parity`).

Polygraphy runners: https://github.com/NVIDIA/TensorRT/tree/main/tools/Polygraphy (polygraphy.backend.trt)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.tensorrt import read_sidecar, require_tensorrt
from exporters.trt_profiles import pick_profile, profile_sizes
from surgery.parity import RTOL, Parity, check
from surgery.signature import Signature


def engine_runner(engine_path: str | Path) -> Any:
    """A Polygraphy `TrtRunner` over the engine (deserialized by `EngineFromBytes`); use it as a context manager."""
    require_tensorrt()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))


def _use_profile(runner: Any, sidecar: dict[str, Any], feeds: dict[str, np.ndarray], what: str) -> None:
    """Activate the profile that takes `feeds` (a cache engine: prefill or decode); one profile needs no choice."""
    profiles = sidecar.get("profiles", [])
    if len(profiles) > 1:
        shapes = {n: a.shape for n, a in feeds.items()}
        runner.set_profile(pick_profile(profiles, shapes, what, sidecar.get("profile_names", [])))


def run_engine(engine_path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine once on host arrays, in the profile that takes their shapes; outputs by name
    (`TrtRunner.infer` copies in and out)."""
    sidecar = read_sidecar(engine_path)
    with engine_runner(engine_path) as runner:
        _use_profile(runner, sidecar, feeds, str(engine_path))
        return {k: np.asarray(v) for k, v in runner.infer(feed_dict=feeds).items()}


# Largest |engine - torch| accepted by engine precision, as (atol, rtol x max|torch|). fp32 engines are built with TF32
# off, yet GPU kernels order their reductions differently from torch on the CPU (ONNX Runtime on the CPU measures about
# 3e-6 on MiniLM); fp16 keeps 10 mantissa bits (unit roundoff 4.9e-4) and bf16 7 (3.9e-3), compounded over the layers.
# These are starting points: they have not yet been measured against a real engine.
ENGINE_TOLERANCE = {"fp32": (1e-3, RTOL), "fp16": (2e-2, 1e-2), "bf16": (1e-1, 5e-2)}


def check_engine(
    engine: str | Path,
    module: Any,
    signature: Signature,
    precision: str,
    sizes: list[dict[str, int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> Parity:
    """Run a TensorRT engine (Polygraphy's TrtRunner) on padded batches and compare with torch per output, within
    the precision's `ENGINE_TOLERANCE` unless `atol`/`rtol` say otherwise. An engine of several profiles (a cache
    graph's prefill and decode) is checked by default at one shape inside each, run in the profile that takes it."""
    default_atol, default_rtol = ENGINE_TOLERANCE[precision]
    sidecar = read_sidecar(engine)
    profiles = sidecar.get("profiles", [])
    if sizes is None and len(profiles) > 1:
        sizes = profile_sizes(signature, profiles)

    def run(tensors: list[torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
        wanted = set(runner.get_input_metadata().keys())  # an unused input may have been dropped
        feeds = {n: t.numpy() for n, t in zip(signature.names, tensors) if n in wanted}
        _use_profile(runner, sidecar, feeds, str(engine))
        got = runner.infer(feed_dict=feeds)
        return list(got), [np.asarray(v) for v in got.values()]

    with engine_runner(engine) as runner:
        return check(
            run,
            module,
            signature,
            atol=default_atol if atol is None else atol,
            rtol=default_rtol if rtol is None else rtol,
            sizes=sizes,
        )
