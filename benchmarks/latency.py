"""ONNX Runtime latency, with sessions alternated call by call in one process.

Two sessions timed back to back fight over their spinning thread pools; with spinning off on both and
the calls interleaved (A B A B ...), both see the same machine state and their ratio holds to about ±2%
even where absolute times swing 15-40% between runs (see DESIGN.md).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
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


def time_interleaved(calls: dict[str, Callable[[], object]], runs: int = 100, warmup: int = 10) -> list[Timing]:
    """Call each function `runs` times, round-robin, after `warmup` rounds; the first is the reference."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for k in range(warmup + runs):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if k >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    first = next(iter(times.values()))
    out = []
    for name, ts in times.items():
        q = np.percentile(ts, [10, 90])
        ratio = statistics.median(t / f for t, f in zip(ts, first))
        out.append(Timing(name, statistics.median(ts), float(q[0]), float(q[1]), runs, ratio))
    return out


def alternate(
    models: dict[str, str | Path], feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10, threads: int = 2
) -> list[Timing]:
    """Time ONNX models (no spinning, `threads` each) call by call in turn; the first model is the reference."""
    from exporters.verify import ort_session

    calls = {}
    for name, path in models.items():
        session = ort_session(path, threads=threads, spinning=False)
        inputs = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
        calls[name] = partial(session.run, None, inputs)
    return time_interleaved(calls, runs, warmup)
