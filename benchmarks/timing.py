"""Timing helpers shared by the benchmarks: in-process interleaving, the machine line, paired confidence intervals.

`time_interleaved` and `alternate` serve the demo, swap-cost and merge reports (one process, calls in turn);
the latency harness (`benchmarks/harness.py`) runs each case in its own process and uses `paired_overhead` to
put a confidence interval on each overhead from its per-round ratios against the base.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
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
    interval: tuple[float, float] | None = None  # 95% interval on this / first - 1, from the paired calls

    def to_json(self) -> dict[str, Any]:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        out["interval"] = [round(v, 4) for v in self.interval] if self.interval else None
        return out


def machine() -> dict[str, str]:
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fp32_matmul": torch.get_float32_matmul_precision(),  # "highest": no TF32 on a GPU
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
        interval = paired_overhead(ts, first) if name != next(iter(times)) else None
        out.append(Timing(name, statistics.median(ts), float(q[0]), float(q[1]), runs, ratio, interval))
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


def lockstep(streams: dict[str, Iterator[Any]]) -> dict[str, Any]:
    """Advance every stream one item in turn, in the dict's order, until all are spent; the last item of each.
    Generations stepped this way (`Generator.steps`) are timed side by side, step by step, so that a slow spell of
    a noisy machine falls on all of them, not on whichever ran through it."""
    live, last = dict(streams), {}
    while live:
        for name in list(live):
            item = next(live[name], None)
            if item is None:
                del live[name]
            else:
                last[name] = item
    return last


# ---------------------------------------------------------------------------------- paired confidence intervals


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with `df` degrees of freedom: its density integrated, inverted.

    Simpson's rule on the density from 0 to x, bisected on x; good to about 1e-6, which is all an interval needs.
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # P(T <= x) for x >= 0
        u = np.linspace(0.0, x, 4001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(u * u / df))
        h = x / 4000
        return 0.5 + h / 3 * float(f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_overhead(case: Sequence[float], base: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A `level` confidence interval on case/base - 1 from paired rounds: a t-interval on the mean log ratio.

    `case[i]` and `base[i]` are the two cases' times (e.g. round medians) in the same interleaved round i, so slow
    spells of the machine cancel in each ratio. None with fewer than two rounds (no spread to estimate).
    """
    if len(case) != len(base):
        raise ValueError(f"paired rounds differ in number: {len(case)} against {len(base)}")
    n = len(case)
    if n < 2:
        return None
    logs = np.log(np.asarray(case, dtype=float) / np.asarray(base, dtype=float))
    half = t_quantile(0.5 + level / 2, n - 1) * float(logs.std(ddof=1)) / math.sqrt(n)
    mean = float(logs.mean())
    return math.exp(mean - half) - 1, math.exp(mean + half) - 1
