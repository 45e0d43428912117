"""ONNX Runtime latency, with sessions alternated call by call in one process.

Two sessions timed back to back fight over their spinning thread pools; with spinning off on both and
the calls interleaved (A B A B ...), both see the same machine state and their ratio holds to about ±2%
even where absolute times swing 15-40% between runs (see DESIGN.md).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one model: median and the 10th and 90th percentiles over `runs` calls."""

    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    ratio_to_first: float  # median over calls of (this call / the first model's call in the same round)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def machine() -> dict[str, str]:
    import onnxruntime
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def alternate(
    models: dict[str, str | Path], feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10, threads: int = 2
) -> list[Timing]:
    """Time each ONNX model `runs` times, round-robin, after `warmup` rounds; the first model is the reference."""
    from exporters.verify import ort_session

    sessions = {name: ort_session(path, threads=threads, spinning=False) for name, path in models.items()}
    inputs = {
        name: {i.name: feeds[i.name] for i in s.get_inputs()} for name, s in sessions.items()
    }
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for k in range(warmup + runs):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, inputs[name])
            if k >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    first = next(iter(times.values()))
    out = []
    for name, ts in times.items():
        q = np.percentile(ts, [10, 90])
        ratio = statistics.median(t / f for t, f in zip(ts, first))
        out.append(Timing(name, statistics.median(ts), float(q[0]), float(q[1]), runs, ratio))
    return out
