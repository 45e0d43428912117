"""One (variant, backend) of the latency harness in its own process: `python -m benchmarks.worker`.

The parent (`benchmarks/harness.py`) starts it with an `Artifact` and a backend, then talks JSON lines over
stdin/stdout. The worker loads the model and answers `{"ready": true}`; then, per request
`{"batch", "seq", "calls"}`, it runs `calls` timed forward passes at that shape and answers `{"times_ms": [...]}`.
The first request at a shape builds the call (moves inputs, captures a CUDA graph, compiles) and runs `WARMUP`
untimed calls, so compile and capture time never enter the timings; a request with `calls: 0` does only that.
A failure while loading or building answers `{"error": "..."}` and the worker exits, and the parent drops it.

| backend | runs |
|---|---|
| torch, torch-cuda | the exported program's module, eager (CPU, or CUDA with a synchronize per call) |
| torch-cuda-graphs | one forward captured as a CUDA graph per shape, replayed |
| torch-compile, torch-cuda-compile | `torch.compile(module, mode=COMPILE_MODES[m][0], dynamic=False)`, C++ on CPU |
| torch-cuda-compile-graphs | the same with Inductor's CUDA graphs (`reduce-overhead`, or `max-autotune`) |
| ort, ort-cuda | an ONNX Runtime session (spinning off), or the swappable session with its pack |
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.variants import Artifact

WARMUP = 5  # untimed calls when a shape's call is built: compiles, autotunes and records Inductor's graphs
# --compile-mode: the torch.compile mode of the plain backends and of the -graphs backends
COMPILE_MODES = {
    "default": ("default", "reduce-overhead"),
    "max-autotune": ("max-autotune-no-cudagraphs", "max-autotune"),
}


def compile_mode(backend: str, mode: str) -> str | None:
    """The torch.compile mode a backend runs under, or None for a backend that does not compile."""
    if "-compile" not in backend:
        return None
    return COMPILE_MODES[mode][backend.endswith("-graphs")]


def serve(artifact: Artifact, backend: str, threads: int, mode: str = "default") -> None:
    """Load one variant on one backend, then answer timing requests from the parent until stdin closes."""
    import torch

    from surgery.signature import Signature

    torch.set_num_threads(threads)
    try:
        sig = Signature.from_json(json.loads(Path(artifact.signature).read_text()))
        run = _runner(artifact, backend, threads, sig, mode)
    except Exception as exc:  # noqa: BLE001  any failure is reported to the parent, which drops this case
        traceback.print_exc(file=sys.stderr)
        _reply({"error": _why(exc)})
        return
    _reply({"ready": True})
    calls: dict[tuple[int, int], Callable[[], Any]] = {}  # one set of inputs (and CUDA graph) per grid point
    for line in sys.stdin:
        req = json.loads(line)
        key = (req["batch"], req["seq"])
        if key not in calls:
            calls.clear()  # the previous grid point's graph and buffers go before the next is made
            try:
                calls[key] = run(sig, {"batch": key[0], "seq": key[1]})
                for _ in range(WARMUP):
                    calls[key]()
            except Exception as exc:  # noqa: BLE001  likewise: compile and capture fail in many ways
                traceback.print_exc(file=sys.stderr)  # the whole story on the worker's stderr, one line to the parent
                _reply({"error": _why(exc)})
                return
        call = calls[key]
        times = []
        for _ in range(req["calls"]):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        _reply({"times_ms": times})


def _reply(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def _why(exc: Exception) -> str:
    """The exception's last line, with the innermost frame of the traceback that raised it."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}{where}"[:400]


def _inputs(sig: Any, sizes: dict[str, int]) -> list[Any]:
    tensors = sig.examples(sizes)
    for i, name in enumerate(sig.names):
        if name == "adapter_id":  # routed: rows cycle through the adapters and the base (-1)
            n = sig.inputs[i].high
            tensors[i] = tensors[i].new_tensor([(b % (n + 1)) - 1 for b in range(tensors[i].shape[0])])
    return tensors


def _runner(
    artifact: Artifact, backend: str, threads: int, sig: Any, mode: str
) -> Callable[[Any, dict[str, int]], Callable[[], Any]]:
    """A factory: grid point -> a zero-argument call that runs one forward pass (synchronised on GPU)."""
    import torch

    if backend.startswith("ort"):
        return _ort_runner(artifact, backend, threads)

    import surgery.kernels  # noqa: F401  a houlsby-kernel program calls torch.ops.surgery.bottleneck

    from surgery.safe_files import check_pt2

    check_pt2(artifact.pt2, str(artifact.pt2))  # the same check as every .pt2 this tool opens
    device = "cuda" if backend.startswith("torch-cuda") else "cpu"
    module = on_device(torch.export.load(artifact.pt2), device)
    compiled = compile_mode(backend, mode)
    inductor_graphs = compiled in ("reduce-overhead", "max-autotune")
    inference = compiled is None  # torch.compile cases run under no_grad, the usual way to compile for inference
    if compiled is not None:
        module = torch.compile(module, mode=compiled, dynamic=False)

    def torch_call(sig: Any, sizes: dict[str, int]) -> Callable[[], Any]:
        tensors = [t.to(device) for t in _inputs(sig, sizes)]
        if device == "cpu":
            return lambda: _no_grad_call(sig, module, tensors, inference)
        if backend == "torch-cuda-graphs":
            return _cuda_graph(sig, module, tensors)

        def cuda_call() -> Any:
            if inductor_graphs:  # a new step: the last call's outputs (in Inductor's graph pool) are dead
                torch.compiler.cudagraph_mark_step_begin()
            out = _no_grad_call(sig, module, tensors, inference)
            torch.cuda.synchronize()
            return out

        return cuda_call

    return torch_call


def _ort_runner(artifact: Artifact, backend: str, threads: int) -> Callable[[Any, dict[str, int]], Callable[[], Any]]:
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


def on_device(program: Any, device: str) -> Any:
    """The module of an exported program with its weights and constants on `device`.

    An exported graph records devices in its ops (`arange(..., device=cpu)`), so `.to("cuda")` on the
    module is not enough; torch.export's `move_to_device_pass` rewrites those too.
    """
    if device != "cpu":
        import torch
        from torch.export.passes import move_to_device_pass

        if device == "cuda":  # with its index: the graph's _assert_tensor_metadata(device=...) must equal cuda:0
            device = f"cuda:{torch.cuda.current_device()}"
        program = move_to_device_pass(program, device)
    return program.module()


def _no_grad_call(sig: Any, module: Any, tensors: list[Any], inference: bool = True) -> Any:
    """One forward pass without autograd: under inference_mode, or no_grad (`inference=False`, for torch.compile)."""
    import torch

    with torch.inference_mode() if inference else torch.no_grad():
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One latency case; started by benchmarks.harness, not by hand.")
    p.add_argument("--backend", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--artifact", required=True, help="the Artifact as JSON")
    p.add_argument("--compile-mode", default="default", choices=sorted(COMPILE_MODES))
    a = p.parse_args(argv)
    serve(Artifact.from_json(json.loads(a.artifact)), a.backend, a.threads, a.compile_mode)


if __name__ == "__main__":
    main()
