"""The latency harness: every (variant, backend) in its own worker process, rounds interleaved, and its reports.

For each grid point the parent first has every worker build its call (inputs, CUDA graph, torch.compile: all
workers at once, untimed), then runs rounds A B C A B C ...: each worker times `calls` forward passes per round,
after `warmup` untimed rounds. Reported per case and grid point: median, p90, p99, min and max over all timed
calls; the overhead of the median against the base variant on the same backend and grid point; and a 95%
confidence interval on that overhead from the paired per-round ratios (case round median / base round median,
the same round, so a slow spell of the machine cancels): `timing.paired_overhead`.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import machine, paired_overhead
from benchmarks.variants import Artifact

BACKENDS = (
    "torch",
    "torch-compile",
    "ort",
    "torch-cuda",
    "torch-cuda-graphs",
    "torch-cuda-compile",
    "torch-cuda-compile-graphs",
    "ort-cuda",
)
JSON_KEYS = (
    "model",
    "variant",
    "backend",
    "batch",
    "seq",
    "median_ms",
    "p90_ms",
    "p99_ms",
    "min_ms",
    "max_ms",
    "calls",
    "overhead",
    "overhead_ci",
    "round_ms",
    "threads",
    "machine",
)
LEVEL = 0.95  # of the overhead's confidence interval


@dataclass
class Row:
    model: str
    variant: str
    backend: str
    batch: int
    seq: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    calls: int
    overhead: float | None  # median / base median - 1, same backend and grid point
    overhead_ci: list[float] | None  # 95% interval on the overhead from paired per-round ratios (None for the base)
    round_ms: list[float]  # the median of each timed round, ms: what the interval pairs
    threads: int
    machine: dict[str, str]


def missing_backend(backend: str) -> str | None:
    """Why a backend cannot run here, or None when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"
    if backend in ("torch", "ort", "torch-compile"):
        return None
    if backend.startswith("torch-cuda"):
        import torch

        return None if torch.cuda.is_available() else "torch sees no CUDA GPU"
    import onnxruntime  # ort-cuda

    ok = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return None if ok else "onnxruntime has no CUDAExecutionProvider (pip install -e '.[gpu]': onnxruntime-gpu)"


class WorkerFailed(Exception):
    """A worker reported an error (or died) while loading or building its call; the harness drops that case."""


class Worker:
    """One (variant, backend) in its own Python process (`benchmarks/worker.py`), driven with JSON lines."""

    def __init__(self, artifact: Artifact, backend: str, threads: int, compile_mode: str = "default"):
        self.artifact, self.backend = artifact, backend
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.worker",
            "--backend",
            backend,
            "--threads",
            str(threads),
            "--artifact",
            json.dumps(artifact.to_json()),
            "--compile-mode",
            compile_mode,
        ]
        # PASSIVE: an idle worker's OpenMP threads sleep instead of spinning on the core the next worker needs
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)

    @property
    def name(self) -> str:
        return f"{self.artifact.variant}/{self.backend}"

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerFailed(f"the worker died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerFailed(reply["error"])
        return reply

    def ask(self, batch: int, seq: int, calls: int) -> None:
        self.proc.stdin.write(json.dumps({"batch": batch, "seq": seq, "calls": calls}) + "\n")

    def time(self, batch: int, seq: int, calls: int) -> list[float]:
        self.ask(batch, seq, calls)
        return self.read()["times_ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _answered(
    workers: list[Worker], on_skip: Callable[[str, str], None] | None, timeout: float | None = None
) -> list[Worker]:
    """The workers whose pending reply came within `timeout` seconds (all together; None: no limit). Each one
    that failed or did not answer in time is closed (killed) and reported to `on_skip`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = {w.proc.stdout.fileno(): w for w in workers}
    done: set[Worker] = set()
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(list(pending), [], [], left)
        if not ready:
            break
        for fd in ready:
            w = pending.pop(fd)
            try:
                w.read()
                done.add(w)
            except WorkerFailed as exc:
                w.close()
                if on_skip:
                    on_skip(w.name, str(exc))
    for w in pending.values():
        w.proc.kill()
        w.close()
        if on_skip:
            on_skip(w.name, f"no answer within {timeout:g} s (loading, compiling or capturing); raise --build-timeout")
    return [w for w in workers if w in done]


def run_grid(
    model: str,
    artifacts: list[Artifact],
    backends: list[str],
    grid: list[tuple[int, int]],
    rounds: int = 10,
    calls: int = 5,
    warmup: int = 2,
    threads: int = 2,
    on_round: Callable[[], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_point: Callable[[list[Row]], None] | None = None,
    compile_mode: str = "default",
    build_timeout: float | None = None,
) -> list[Row]:
    """Time every (artifact, backend) on every grid point, interleaved round by round across processes.

    A backend that cannot run here, or a case whose worker fails to load or build (or takes longer than
    `build_timeout` seconds to, per grid point), is reported to `on_skip` (backend or variant/backend, and why)
    and left out; the others go on.
    """
    workers: list[Worker] = []
    for backend in backends:
        reason = missing_backend(backend)
        if reason:
            if on_skip:
                on_skip(backend, reason)
            continue
        for art in artifacts:
            if (art.onnx if backend.startswith("ort") else art.pt2) is None:
                continue
            workers.append(Worker(art, backend, threads, compile_mode))
    info = machine()
    rows: list[Row] = []
    try:
        workers = _answered(workers, on_skip, build_timeout)  # all load at once; timing starts when all are ready
        for batch, seq in grid:
            for w in workers:  # every worker builds and warms its call for this shape at once, untimed
                w.ask(batch, seq, 0)
            workers = _answered(workers, on_skip, build_timeout)
            times: dict[str, list[list[float]]] = {w.name: [] for w in workers}
            for k in range(warmup + rounds):
                for w in workers:
                    t = w.time(batch, seq, calls)
                    if k >= warmup:
                        times[w.name].append(t)
                if on_round:
                    on_round()
            for w in workers:
                ts = np.concatenate(times[w.name])
                p90, p99 = np.percentile(ts, [90, 99])
                medians = [float(np.median(t)) for t in times[w.name]]
                rows.append(
                    Row(
                        model,
                        w.artifact.variant,
                        w.backend,
                        batch,
                        seq,
                        float(np.median(ts)),
                        float(p90),
                        float(p99),
                        float(ts.min()),
                        float(ts.max()),
                        len(ts),
                        None,
                        None,
                        medians,
                        threads,
                        info,
                    )
                )
            overheads(rows)
            if on_point:  # e.g. write the reports so far: a long grid cut short keeps its finished points
                on_point(rows)
    finally:
        for w in workers:
            w.close()
    return rows


def overheads(rows: list[Row], level: float = LEVEL) -> None:
    """Set each row's overhead against the base row of its backend and grid point, and its paired interval."""
    base = {(r.backend, r.batch, r.seq): r for r in rows if r.variant == "base"}
    for r in rows:
        ref = base.get((r.backend, r.batch, r.seq))
        r.overhead = None if ref is None else r.median_ms / ref.median_ms - 1
        ci = None if ref is None or ref is r else paired_overhead(r.round_ms, ref.round_ms, level)
        r.overhead_ci = None if ci is None else list(ci)


def verdict(row: Row, target: float) -> str:
    """`met` when the whole interval is at or below `target` (a fraction), `missed` when all of it is above,
    else `within noise` of the target; from the point estimate alone where there is no interval."""
    if row.overhead is None:
        return ""
    lo, hi = row.overhead_ci or (row.overhead, row.overhead)
    return "met" if hi <= target else "missed" if lo > target else "within noise"


def format_overhead(row: Row) -> str:
    """`+8.0% [+7.1, +8.9]`: the overhead and its confidence interval, in percent."""
    if row.overhead is None:
        return ""
    text = f"{100 * row.overhead:+.1f}%"
    if row.overhead_ci is not None:
        lo, hi = row.overhead_ci
        text += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return text


def markdown(rows: list[Row], title: str, target: float | None = None) -> str:
    """The report's table: one row per case and grid point, with the overhead's interval (and the target's verdict)."""
    m = rows[0].machine if rows else machine()
    setting = (
        f"{m['cpu']} ({m['cores']} cores), GPU {m['gpu']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"{rows[0].threads if rows else '?'} threads; each case in its own process, interleaved. Overhead: "
        f"median over the base's median - 1, with a {100 * LEVEL:.0f}% interval from the paired per-round ratios."
    )
    lines = [f"# {title}", "", setting, ""]
    head = "| backend | batch x seq | variant | median ms | p90 | p99 | min-max | overhead vs base [95% CI] |"
    rule = "|---|---|---|---|---|---|---|---|"
    if target is not None:
        head, rule = head + f" target ≤ {100 * target:g}% |", rule + "---|"
    lines += [head, rule]
    for r in rows:
        line = (
            f"| {r.backend} | {r.batch}x{r.seq} | {r.variant} | {r.median_ms:.2f} | {r.p90_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.min_ms:.2f}-{r.max_ms:.2f} | {format_overhead(r)} |"
        )
        if target is not None:
            line += f" {verdict(r, target) if r.variant != 'base' else ''} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_reports(rows: list[Row], out: Path, title: str, target: float | None = None) -> dict[str, Path]:
    """results.json, results.md and results.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps([asdict(r) for r in rows], indent=1))
    paths["md"].write_text(markdown(rows, title, target))
    _plot(rows, paths["png"], title)
    return paths


def _plot(rows: list[Row], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        from surgery.errors import SurgeryError

        raise SurgeryError("the latency plot needs matplotlib: pip install 'surgery[bench]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.backend, r.batch, r.seq) for r in rows})
    variants = list(dict.fromkeys(r.variant for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2 + 1.6 * len(groups)), 4.5))
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        by = {(r.backend, r.batch, r.seq): r for r in rows if r.variant == v}
        xs = [i + j * width for i, g in enumerate(groups) if g in by]
        ax1.bar(xs, [by[g].median_ms for g in groups if g in by], width, label=v)
        over = [100 * (by[g].overhead or 0) for g in groups if g in by]
        err = [
            [100 * ((r.overhead or 0) - r.overhead_ci[0]), 100 * (r.overhead_ci[1] - (r.overhead or 0))]
            if r.overhead_ci
            else [0, 0]
            for r in (by[g] for g in groups if g in by)
        ]
        ax2.bar(xs, over, width, label=v, yerr=np.asarray(err).T if err else None, capsize=2)
    labels = [f"{b.replace('torch-cuda-', 'cuda-')}\n{n}x{s}" for b, n, s in groups]
    for ax, ylabel in ((ax1, "median latency (ms)"), (ax2, "overhead vs base (%), 95% CI")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
