"""Latency harness: every (variant, backend) in its own process, interleaved, with warm-up.

    python -m benchmarks.latency --model minilm --grid 1x128,16x256 --backends torch,ort
    python -m benchmarks.latency --model gpt2-medium --grid paper          # on a GPU machine
    surgery bench minilm.adapted.pt2 --backends torch,ort --batch 1,16 --seq 128,256

The parent prepares the artifacts once (a .pt2 per variant for torch, an ONNX per variant for ONNX Runtime,
a pack for the swappable variant), starts one worker process per case, then for each grid point runs
rounds A B C A B C ...: each worker times `--calls` forward passes per round, after warm-up rounds. Workers
are separate processes, so no two cases share an allocator, a thread pool or a cache of compiled kernels;
ONNX Runtime runs with spinning off (a waiting pool would steal the core from the next worker).
Reported per case and grid point: median, p90, p99, min and max over all timed calls, and the overhead
of the median against the base variant on the same backend and grid point.

In-process helpers (`time_interleaved`, `alternate`) serve the demo and swap-cost reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

GRIDS = {"tiny": [(1, 16)], "default": [(1, 128)], "paper": [(1, 128), (16, 256), (32, 512)]}
BACKENDS = ("torch", "ort", "torch-cuda", "torch-cuda-graphs", "ort-cuda", "trt")
JSON_KEYS = ("model", "variant", "backend", "batch", "seq", "median_ms", "p90_ms", "p99_ms", "min_ms", "max_ms",
             "calls", "overhead", "threads", "machine")


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


# ---------------------------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Artifact:
    """What one variant's workers load: a .pt2 (torch backends), an ONNX (ORT), a pack (swappable)."""

    variant: str
    pt2: str | None
    onnx: str | None
    pack: str | None = None
    signature: str | None = None  # JSON file of the Signature, for making inputs


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
    threads: int
    machine: dict[str, str]


def missing_backend(backend: str) -> str | None:
    """Why a backend cannot run here, or None when it can."""
    if backend in ("torch", "ort"):
        return None
    if backend.startswith("torch-cuda"):
        import torch

        return None if torch.cuda.is_available() else "torch sees no CUDA GPU"
    if backend == "ort-cuda":
        import onnxruntime

        ok = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        return None if ok else "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "TensorRT is not installed (pip install 'surgery[trt]' on a machine with an NVIDIA GPU)"
        return "the TensorRT backend of the harness runs engines from benchmarks/gpu_check.sh"
    return f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"


class Worker:
    """One (variant, backend) in its own Python process, driven over stdin/stdout with JSON lines."""

    def __init__(self, artifact: Artifact, backend: str, threads: int):
        self.artifact, self.backend = artifact, backend
        cmd = [sys.executable, "-m", "benchmarks.latency", "worker", "--backend", backend, "--threads", str(threads),
               "--artifact", json.dumps(asdict(artifact))]
        # PASSIVE: an idle worker's OpenMP threads sleep instead of spinning on the core the next worker needs
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)

    def wait_ready(self) -> None:
        """Block until the worker has loaded its model (workers load in parallel; timing starts after all)."""
        self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.artifact.variant}/{self.backend} died (exit {self.proc.wait()})")
        return json.loads(line)

    def time(self, batch: int, seq: int, calls: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"batch": batch, "seq": seq, "calls": calls}) + "\n")
        return self._read()["times_ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


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
) -> list[Row]:
    """Time every (artifact, backend) on every grid point, interleaved round by round across processes."""
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
            workers.append(Worker(art, backend, threads))
    info = machine()
    rows: list[Row] = []
    try:
        for w in workers:
            w.wait_ready()
        for batch, seq in grid:
            times: dict[int, list[float]] = {i: [] for i in range(len(workers))}
            for k in range(warmup + rounds):
                for i, w in enumerate(workers):
                    t = w.time(batch, seq, calls)
                    if k >= warmup:
                        times[i] += t
                if on_round:
                    on_round()
            for i, w in enumerate(workers):
                ts = np.asarray(times[i])
                p90, p99 = np.percentile(ts, [90, 99])
                rows.append(Row(model, w.artifact.variant, w.backend, batch, seq, float(np.median(ts)), float(p90), float(p99),
                                float(ts.min()), float(ts.max()), len(ts), None, threads, info))
            _overheads(rows)
            if on_point:  # e.g. write the reports so far: a long grid cut short keeps its finished points
                on_point(rows)
    finally:
        for w in workers:
            w.close()
    return rows


def _overheads(rows: list[Row]) -> None:
    base = {(r.backend, r.batch, r.seq): r.median_ms for r in rows if r.variant == "base"}
    for r in rows:
        ref = base.get((r.backend, r.batch, r.seq))
        r.overhead = None if ref is None else r.median_ms / ref - 1


def write_reports(rows: list[Row], out: Path, title: str) -> dict[str, Path]:
    """results.json, results.md and results.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps([asdict(r) for r in rows], indent=1))
    m = rows[0].machine if rows else machine()
    lines = [f"# {title}", "", f"{m['cpu']} ({m['cores']} cores), GPU {m['gpu']}, torch {m['torch']}, onnxruntime "
             f"{m['onnxruntime']}, {rows[0].threads if rows else '?'} threads; each case in its own process, interleaved.", "",
             "| backend | batch x seq | variant | median ms | p90 | p99 | min-max | overhead vs base |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = "" if r.overhead is None else f"{100 * r.overhead:+.1f}%"
        lines.append(f"| {r.backend} | {r.batch}x{r.seq} | {r.variant} | {r.median_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | "
                     f"{r.min_ms:.2f}-{r.max_ms:.2f} | {over} |")
    paths["md"].write_text("\n".join(lines) + "\n")
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
        ax2.bar(xs, [100 * (by[g].overhead or 0) for g in groups if g in by], width, label=v)
    labels = [f"{b.replace('torch-cuda-', 'cuda-')}\n{n}x{s}" for b, n, s in groups]
    for ax, ylabel in ((ax1, "median latency (ms)"), (ax2, "overhead vs base (%)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ worker


def _worker(artifact: Artifact, backend: str, threads: int) -> None:
    """Load one variant on one backend, then answer timing requests from the parent until stdin closes."""
    import torch

    from surgery.signature import Signature

    torch.set_num_threads(threads)
    sig = Signature.from_json(json.loads(Path(artifact.signature).read_text()))
    run = _runner(artifact, backend, threads, sig)
    print(json.dumps({"ready": True}), flush=True)
    calls: dict[tuple[int, int], Callable[[], Any]] = {}  # one set of inputs (and CUDA graph) per grid point
    for line in sys.stdin:
        req = json.loads(line)
        key = (req["batch"], req["seq"])
        if key not in calls:
            calls.clear()  # the previous grid point's graph and buffers go before the next is made
            calls[key] = run(sig, {"batch": key[0], "seq": key[1]})
        call = calls[key]
        times = []
        for _ in range(req["calls"]):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"times_ms": times}), flush=True)


def _inputs(sig: Any, sizes: dict[str, int]) -> list[Any]:
    tensors = sig.examples(sizes)
    for i, name in enumerate(sig.names):
        if name == "adapter_id":  # routed: rows cycle through the adapters and the base (-1)
            n = sig.inputs[i].high
            tensors[i] = tensors[i].new_tensor([(b % (n + 1)) - 1 for b in range(tensors[i].shape[0])])
    return tensors


def _runner(artifact: Artifact, backend: str, threads: int, sig: Any) -> Callable[[Any, dict[str, int]], Callable[[], Any]]:
    """A factory: grid point -> a zero-argument call that runs one forward pass (synchronised on GPU)."""
    import torch

    if backend.startswith("ort"):
        from exporters.verify import CPU, CUDA, ort_session

        providers = CUDA if backend == "ort-cuda" else CPU
        if artifact.pack:
            from exporters.runtime import AdaptedSession

            adapted = AdaptedSession(artifact.onnx, threads=threads, spinning=False, providers=providers)
            adapted.load("pack", artifact.pack)
            session, options = adapted.session, adapted.run_options("pack")
        else:
            session, options = ort_session(artifact.onnx, threads=threads, spinning=False, providers=providers), None
        wanted = {i.name for i in session.get_inputs()}
        owner = adapted if artifact.pack else session  # the AdaptedSession keeps the pack's memory alive

        def ort_call(sig: Any, sizes: dict[str, int]) -> Callable[[], Any]:
            feeds = {n: t.numpy() for n, t in zip(sig.names, _inputs(sig, sizes)) if n in wanted}
            assert owner is not None
            return partial(session.run, None, feeds, options)

        return ort_call

    import surgery.kernels  # noqa: F401  a houlsby-kernel program calls torch.ops.surgery.bottleneck

    device = "cuda" if backend.startswith("torch-cuda") else "cpu"
    from surgery.safe_files import check_pt2

    check_pt2(artifact.pt2, str(artifact.pt2))  # the same check as every .pt2 this tool opens
    module = on_device(torch.export.load(artifact.pt2), device)

    def torch_call(sig: Any, sizes: dict[str, int]) -> Callable[[], Any]:
        tensors = [t.to(device) for t in _inputs(sig, sizes)]
        if device == "cpu":
            return lambda: _no_grad_call(sig, module, tensors)
        if backend == "torch-cuda-graphs":
            return _cuda_graph(sig, module, tensors)

        def cuda_call() -> Any:
            out = _no_grad_call(sig, module, tensors)
            torch.cuda.synchronize()
            return out

        return cuda_call

    return torch_call


def on_device(program: Any, device: str) -> Any:
    """The module of an exported program with its weights and constants on `device`.

    An exported graph records devices in its ops (`arange(..., device=cpu)`), so `.to("cuda")` on the
    module is not enough; torch.export's `move_to_device_pass` rewrites those too.
    """
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()


def _no_grad_call(sig: Any, module: Any, tensors: list[Any]) -> Any:
    import torch

    with torch.inference_mode():
        return sig.call(module, tensors)


def _cuda_graph(sig: Any, module: Any, tensors: list[Any]) -> Callable[[], Any]:
    """Capture one forward pass at these shapes as a CUDA graph; replay it per call."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph, as CUDA graph capture requires
            _no_grad_call(sig, module, tensors)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _no_grad_call(sig, module, tensors)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return replay


# ------------------------------------------------------------------------------------------- variants


def parse_grid(text: str) -> list[tuple[int, int]]:
    """`paper`, `tiny`, `default`, or `1x128,16x256`."""
    if text in GRIDS:
        return GRIDS[text]
    try:
        return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]
    except ValueError as exc:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"--grid {text!r}: give {', '.join(GRIDS)} or BATCHxSEQ pairs, e.g. 1x128,16x256") from exc


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        p = argparse.ArgumentParser()
        p.add_argument("--backend")
        p.add_argument("--threads", type=int)
        p.add_argument("--artifact")
        a = p.parse_args(argv[1:])
        _worker(Artifact(**json.loads(a.artifact)), a.backend, a.threads)
        return
    from benchmarks.variants import VARIANTS, prepare
    from cli.common import quiet_libraries

    quiet_libraries()
    p = argparse.ArgumentParser(description="Latency of base and adapted variants, each in its own process, interleaved.")
    p.add_argument("--model", default="minilm", help="minilm (pretrained), minilm-random or gpt2-medium (random weights), or a source path")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--backends", default="torch,ort", help=f"comma-separated, from: {', '.join(BACKENDS)}")
    p.add_argument("--grid", default="default", help="tiny, default (1x128), paper (1x128,16x256,32x512), or BxS,...")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=5, help="timed calls per worker per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--work", type=Path, help="where the exported variants go (default: OUT/artifacts)")
    a = p.parse_args(argv)
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    grid = parse_grid(a.grid)
    backends = a.backends.split(",")
    with console.status(f"exporting variants of {a.model} ..."):
        onnx = any(b.startswith("ort") for b in backends)
        artifacts = prepare(a.model, a.variants.split(","), a.work or a.out / "artifacts", r=a.r, onnx=onnx)
    n_rounds = len(grid) * (a.rounds + 2)
    with Progress(console=console) as progress:
        task = progress.add_task("timing", total=n_rounds)
        title = f"{a.model}: adapter latency, r={a.r}"
        rows = run_grid(a.model, artifacts, backends, grid, a.rounds, a.calls, 2, a.threads,
                        on_round=lambda: progress.advance(task),
                        on_skip=lambda b, why: console.print(f"[yellow]skipping backend {b}: {why}[/]"),
                        on_point=lambda done: write_reports(done, a.out, title))
    paths = write_reports(rows, a.out, title)
    print(paths["md"].read_text())
    console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")


if __name__ == "__main__":
    main()
