"""`surgery run`: run an exported ONNX model, with an adapter pack active if it is swappable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from cli.common import emit_json, out, renamed, stage
from cli.options import ATOL_HELP, RTOL_HELP, Json, OldSave, OldTolerance, Output, with_help, Trust
from runtime.adapted import AdaptedSession
from runtime.errors import SurgeryError
from runtime.files import check_onnx_data
from runtime.inputs import ORT_DTYPES, CacheLayout, check_cache_feeds, check_feeds, graph_inputs, vocab_size
from runtime.session import ort_session
from surgery.io import atomic_output


def _inputs(session, input_file: Optional[Path], shape: str, onnx_path: Path) -> dict[str, np.ndarray]:
    """Inputs from an .npz (arrays by input name), or random token ids and a full mask of `shape`; checked against
    the graph's inputs and vocabulary (`runtime/inputs.py`) before ONNX Runtime sees them. A causal LM's cache
    graph takes `past=N` in `shape` (default 0, a prompt), and its feeds are checked as a cache too."""
    vocab = vocab_size(onnx_path)
    cache = CacheLayout.of(graph_inputs(session), session.get_modelmeta().custom_metadata_map)
    if input_file is not None:
        if not input_file.is_file():
            raise SurgeryError(f"--input {input_file}: no such file; give an .npz with one array per input name")
        try:
            with np.load(input_file) as data:
                feeds = {k: data[k] for k in data.files}
        except (ValueError, OSError) as exc:
            raise SurgeryError(f"--input {input_file}: not a readable .npz ({exc})") from exc
        if cache is not None:
            check_cache_feeds(feeds, cache, f"--input {input_file}")
        check_feeds(feeds, graph_inputs(session), vocab, f"--input {input_file}")
        return feeds
    try:
        sizes = dict((k, int(v)) for k, v in (kv.split("=") for kv in shape.split(",")))
    except ValueError as exc:
        raise SurgeryError(f"--shape {shape!r}: write it as batch=1,seq=128") from exc
    if cache is not None:  # the mask covers the past and the new tokens
        sizes = {"batch": 1, "seq": 128, **sizes}
        sizes.update(past=sizes.get("past", 0), total=sizes.get("past", 0) + sizes["seq"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("adapters."):
            continue
        dims = [
            d if isinstance(d, int) else sizes.get(d, sizes.get("seq" if k else "batch", 1))
            for k, d in enumerate(i.shape)
        ]
        if "float" in i.type:  # in the graph's float type (a half-precision export's cache is fp16)
            feeds[i.name] = rng.standard_normal(dims).astype(ORT_DTYPES.get(i.type, np.float32))
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones(dims, dtype=np.int64)
        elif i.name == "adapter_id":
            feeds[i.name] = np.zeros(dims, dtype=np.int64)
        elif i.name == "position_ids" and cache is not None:  # the new tokens sit after the past
            feeds[i.name] = np.broadcast_to(np.arange(sizes["past"], sizes["total"]), dims).astype(np.int64)
        else:
            feeds[i.name] = rng.integers(0, min(vocab or 1000, 1000), dims, dtype=np.int64)
    if cache is not None:
        check_cache_feeds(feeds, cache, f"--shape {shape}")
    check_feeds(feeds, graph_inputs(session), vocab, f"--shape {shape}")
    return feeds


ENGINE_SUFFIXES = (".plan", ".engine")
BY = " (default: by the engine's precision)."


def _run_engine(model: Path, adapter, input_file, shape, against, tolerance, rtol, json, trust=False):
    """A TensorRT engine through Polygraphy's TrtRunner; with --against, a parity check against torch instead."""
    from exporters.tensorrt import read_sidecar
    from exporters.trt_run import run_engine

    if adapter is not None:
        raise SurgeryError(f"engines hold their adapters; refit one in place with `surgery swap {model} {adapter}`")
    sidecar = read_sidecar(model)
    if against is not None:
        from exporters.trt_run import check_engine
        from surgery.pipeline import open_model

        captured = open_model(against, trust=trust)
        parity = check_engine(model, captured.gm, captured.signature, sidecar["precision"], atol=tolerance, rtol=rtol)
        if json:
            emit_json({"engine": str(model), "against": against, "precision": sidecar["precision"], **parity.to_json()})
        else:
            out.print(f"max |TensorRT - torch| ({sidecar['precision']}): {parity.summary()}")
        if not parity.ok:
            raise SurgeryError(
                f"{model} differs from {against} by more than --atol + --rtol x max|torch| allow: {parity.summary()}"
            )
        return None, None
    check_onnx_data(sidecar["source_onnx"])
    feeds = _inputs(ort_session(sidecar["source_onnx"]), input_file, shape, Path(sidecar["source_onnx"]))
    outputs = run_engine(model, feeds)
    return list(outputs), list(outputs.values())


def run(
    model: Annotated[Path, typer.Argument(help="An ONNX model written by `surgery export`.")],
    adapter: Annotated[
        Optional[Path], typer.Option("--adapter", help="A pack to activate (.onnx_adapter or .safetensors).")
    ] = None,
    input_file: Annotated[Optional[Path], typer.Option("--input", help=".npz with one array per input name.")] = None,
    shape: Annotated[
        str,
        typer.Option("--shape", help="Random inputs of this size when no --input (a KV-cache graph: past=N too)."),
    ] = "batch=1,seq=128",
    save: with_help(Output, "Write the outputs to this .npz (written atomically).") = None,
    against: Annotated[
        Optional[str], typer.Option("--against", help="A TensorRT engine: compare it with this model in torch.")
    ] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help=f"With --against, {ATOL_HELP}{BY}")] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help=f"With --against, {RTOL_HELP}{BY}")] = None,
    tolerance: OldTolerance = None,
    old_save: OldSave = None,
    json: Json = False,
    trust: Trust = False,
) -> None:
    """Run an exported model (ONNX Runtime) or a TensorRT engine (.plan) and show its outputs."""
    tolerance = renamed(atol, tolerance, "--atol", "--tolerance")
    save = renamed(save, old_save, "--output", "--save")
    if not model.is_file():
        raise SurgeryError(f"{model}: no such file; give an ONNX model or a TensorRT engine (.plan)")
    if model.suffix in ENGINE_SUFFIXES:
        names, results = _run_engine(model, adapter, input_file, shape, against, tolerance, rtol, json, trust)
        if names is None:
            return
    elif against is not None or tolerance is not None or rtol is not None:
        raise SurgeryError(
            "--against (and its --atol, --rtol) compares a TensorRT engine with torch; "
            "ONNX exports are checked against torch when written"
        )
    elif adapter is not None:
        with stage(f"open {model} in ONNX Runtime with pack {adapter}"):
            session = AdaptedSession(model)
            session.load(adapter.name, adapter)
            feeds = _inputs(session.session, input_file, shape, model)
        with stage(f"run {model} in ONNX Runtime with pack {adapter}"):
            results = session.run(feeds, adapter=adapter.name)
        names = [o.name for o in session.session.get_outputs()]
    else:
        check_onnx_data(model)  # before ONNX Runtime opens it: external data stays beside the model
        with stage(f"open {model} in ONNX Runtime"):
            plain = ort_session(model)
            feeds = _inputs(plain, input_file, shape, model)
        wanted = {i.name for i in plain.get_inputs()}
        with stage(f"run {model} in ONNX Runtime"):
            results = plain.run(None, {k: v for k, v in feeds.items() if k in wanted})
        names = [o.name for o in plain.get_outputs()]
    if save is not None:
        with atomic_output(save) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **dict(zip(names, results)))
    summary = {
        n: {"shape": list(r.shape), "mean": float(np.mean(r)), "std": float(np.std(r))} for n, r in zip(names, results)
    }
    if json:
        emit_json({"model": str(model), "adapter": str(adapter) if adapter else None, "outputs": summary})
        return
    for n, s in summary.items():
        out.print(f"{n}: shape {s['shape']}, mean {s['mean']:.5f}, std {s['std']:.5f}")
