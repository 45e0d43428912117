"""GPU latency of MiniLM, base against Houlsby r=8: torch CUDA eager, ONNX Runtime CUDA, TensorRT (each where present).

    python -m benchmarks.gpu_latency [--model minilm|minilm-random] [--runs 100] [--precision fp32|fp16] \
        [-o out/gpu_latency]

Batch 1, sequence 128. Within a backend the base and the adapted model are timed call by call in turn (see
benchmarks/latency.py), so their ratio is what to read. Every call includes its host-device copies (torch:
inputs already on the GPU, outputs synchronized; ORT: numpy in and out; TensorRT: Polygraphy's TrtRunner with
numpy in and out). A missing backend is reported, not faked. Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
from functools import partial
from pathlib import Path

import torch

from benchmarks.timing import machine, time_interleaved
from benchmarks.variants import open_builtin
from benchmarks.worker import on_device
from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.capture import export_program
from surgery.pipeline import adapt
from benchmarks.args import add_output

SIZES = {"batch": 1, "seq": 128}


def _models(model: str, work: Path):
    base = open_builtin(model, work)
    adapted = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    adapt(adapted, AdapterSpec("houlsby", r=8))
    stand_in_weights(adapted.gm)
    return {"base": base, "houlsby_r8": adapted}


def _torch_calls(models, feeds):
    calls = {}
    for name, m in models.items():
        gm = on_device(export_program(m.gm, m.signature, name), "cuda")
        tensors = [torch.from_numpy(feeds[n]).to("cuda") for n in m.signature.names]

        def call(gm=gm, tensors=tensors, sig=m.signature):
            with torch.no_grad():
                sig.call(gm, tensors)
            torch.cuda.synchronize()

        calls[name] = call
    return calls


def _ort_calls(onnx_paths, feeds):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, "onnxruntime has no CUDAExecutionProvider (pip install 'surgery[gpu]')"
    from exporters.verify import ort_session

    calls = {}
    for name, path in onnx_paths.items():
        session = ort_session(path, providers=("CUDAExecutionProvider",))
        wanted = {i.name for i in session.get_inputs()}
        calls[name] = partial(session.run, None, {k: v for k, v in feeds.items() if k in wanted})
    return calls, None


def _trt_calls(models, folder, feeds, precision, stack):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None, "TensorRT not installed (pip install 'surgery[trt]')"
    from exporters.tensorrt import build_engine, prepare_trt
    from exporters.trt_profiles import parse_shapes
    from exporters.trt_run import engine_runner

    calls = {}
    for name, m in models.items():
        plan = prepare_trt(
            m, folder / f"{name}.plan", precision=precision, shapes=parse_shapes("batch=1:1:8,seq=16:128:256")
        )
        build_engine(plan)
        runner = stack.enter_context(engine_runner(plan.engine))
        wanted = set(runner.get_input_metadata().keys())
        calls[name] = partial(runner.infer, {k: v for k, v in feeds.items() if k in wanted})
    return calls, None


def main() -> None:
    import contextlib

    from exporters.onnx import export_onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm (needs its package) or minilm-random (same shape)")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    add_output(parser, Path("out/gpu_latency"), type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: install a CUDA build of torch (see README) on a GPU machine")
    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="gpu-latency-"))
    models = _models(args.model, folder)
    sig = models["base"].signature
    feeds = {n: t.numpy() for n, t in zip(sig.names, sig.examples(SIZES, seed=1))}
    onnx_paths = {name: export_onnx(m.gm, m.signature, folder / f"{name}.onnx").path for name, m in models.items()}
    report = {
        "machine": {**machine(), "gpu": torch.cuda.get_device_name(0)},
        "sizes": SIZES,
        "runs": args.runs,
        "precision_trt": args.precision,
        "backends": {},
        "missing": {},
    }
    with contextlib.ExitStack() as stack:
        backends = {"torch_cuda_eager": (_torch_calls(models, feeds), None)}
        backends["onnxruntime_cuda"] = _ort_calls(onnx_paths, feeds)
        try:
            backends["tensorrt"] = _trt_calls(models, folder, feeds, args.precision, stack)
        except Exception as exc:  # engine build failed: say so rather than stop the benchmark
            backends["tensorrt"] = (None, f"build failed: {type(exc).__name__}: {exc}")
        for backend, (calls, missing) in backends.items():
            if calls is None:
                report["missing"][backend] = missing
                continue
            try:
                timings = time_interleaved(calls, runs=args.runs, warmup=20)
            except Exception as exc:  # an untested backend on this GPU: report why, keep the others
                report["missing"][backend] = (
                    f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                )
                continue
            report["backends"][backend] = [t.to_json() for t in timings]
    lines = [
        f"# GPU latency, {args.model} batch 1 seq 128 ({report['machine']['gpu']})",
        "",
        "| backend | model | median ms | p10 | p90 | adapted / base |",
        "|---|---|---|---|---|---|",
    ]
    for backend, timings in report["backends"].items():
        for t in timings:
            lines.append(
                f"| {backend} | {t['name']} | {t['median_ms']:.3f} | {t['p10_ms']:.3f} | {t['p90_ms']:.3f} "
                f"| {t['ratio_to_first']:.3f} |"
            )
    lines += [f"- {k}: not measured: {v}" for k, v in report["missing"].items()]
    (args.out / "gpu_latency.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_latency.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report["machine"]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
