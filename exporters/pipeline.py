"""Carrying out an export plan (`exporters.plan.ExportPlan`): open or capture the model, write the export, check it
against torch, write the extra outputs. `run_plan` is the one entry; it returns an `Exported` and prints nothing
(the command prints it), reporting progress through the `step` and `note` it is given.

Four pipelines, one per `ExportPlan.mode`:
- `onnx`: baked, swappable or routed ONNX of models in memory (quantized where asked), and a Triton repository;
  a model that would not fit in memory is streamed instead (`ExportPlan.streamed`);
- `stream`: captured without weights, the weights streamed into NAME.onnx.data, verified block by block;
- `trt`: the TensorRT-ready ONNX, then the engine (or, without TensorRT, the ONNX and the trtexec command);
- `fused-pt2`: a torch.export program with one Triton kernel per bottleneck.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.budget import BUDGET_ENV, estimate
from exporters.kernel_program import export_kernel_program
from exporters.onnx import export_onnx
from exporters.plan import ExportPlan
from exporters.speech import export_speech, export_speech_swappable
from exporters.stream import export_streamed, pack_beside
from exporters.swappable import export_routed, export_swappable
from exporters.tensorrt import TensorRTMissing, build_engine, prepare_trt
from exporters.trt_profiles import DECODE, ONE, PREFILL, parse_profiles
from exporters.triton import write_python_model, write_triton_repo
from surgery.adapters import parse_spec
from surgery.archive import capture_pt2_meta
from surgery.bundle import adapted_manifest
from surgery.errors import SurgeryError
from surgery.io import check_output
from surgery.meta import capture_meta
from surgery.packs import PACKABLE, pack_from_model
from surgery.parity import tolerances, weights_dtype
from surgery.pipeline import adapt, default_output, open_model
from surgery.speech import is_speech_source
from surgery.task_names import SPEECH_RECOGNITION

Step = Callable[[str], AbstractContextManager[Any]]


def _quiet(label: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass
class Exported:
    """What `run_plan` wrote: the plan it carried out (streamed where the model did not fit), the main output, its
    JSON report, and the exporter's own result (for the command's summary)."""

    plan: ExportPlan
    path: Path
    data: dict[str, Any]
    result: Any
    missing: TensorRTMissing | None = None  # --trt without TensorRT: the ONNX was written, the engine was not
    speech: bool = False  # a speech recognizer: its encoder and decoder pair (exporters/speech.py)
    triton: list[str] = field(default_factory=list)  # the Triton config files written


def run_plan(plan: ExportPlan, step: Step = _quiet, note: Callable[[str], None] = lambda text: None) -> Exported:
    """Carry out `plan`: each stage runs inside `step(label)`; `note` hears of an export that streams by itself."""
    if plan.mode == "stream":
        return _streamed(plan, step)
    if plan.mode == "trt":
        return _trt(plan, step)
    if plan.mode == "fused-pt2":
        return _fused_pt2(plan, step)
    if plan.may_stream:
        fit = estimate(plan.source, plan.dtype)
        if fit is not None and not fit.fits:
            if is_speech_source(plan.source, plan.reading.task):
                raise SurgeryError(
                    f"{plan.source}: {fit.line().split(': streaming', 1)[0]}, and an {SPEECH_RECOGNITION} model "
                    f"cannot be streamed; free memory, or set {BUDGET_ENV} higher if the estimate is too cautious"
                )
            note(f"{plan.source}: {fit.line()}")
            return _streamed(plan.streamed(), step)
    return _onnx(plan, step)


def _open(plan: ExportPlan, source: str | None, dtype: bool = True) -> Any:
    r = plan.reading
    shapes = list(r.input_shape) if r.input_shape is not None else None
    kwargs: dict[str, Any] = {"dtype": plan.dtype} if dtype else {}
    return open_model(source, trust=r.trust, input_shapes=shapes, input_dtype=r.input_dtype, task=r.task, **kwargs)


def _onnx(plan: ExportPlan, step: Step) -> Exported:
    """Baked, swappable or routed ONNX of the models in memory, checked against torch; then the Triton repository."""
    path = check_output(plan.output or default_output(plan.source, plan.suffix))
    with step(f"load {', '.join(s or 'minilm' for s in plan.sources)}"):
        models = [_open(plan, s) for s in plan.sources]
    quant = plan.quantization
    if quant is None:
        atol, rtol = tolerances(weights_dtype(models[0].gm), plan.atol, plan.rtol)
    else:
        if models[0].source.path.endswith(".gguf"):  # its Q4_0 / Q8_0 blocks carried (exporters/gguf_carry.py)
            quant = dataclasses.replace(quant, gguf=models[0].source.path)
        atol, rtol = quant.tolerances(plan.atol, plan.rtol, tolerances(weights_dtype(models[0].gm)))
    if models[0].task == SPEECH_RECOGNITION:
        return _speech(plan, path, models[0], atol, rtol, step)
    kind = f" (int{quant.bits} base)" if quant else ""
    with step(f"export {path}{kind} and check it against torch"):
        if plan.adapters == "routed":
            names = [adapter_name(s) for s in plan.sources]
            result = export_routed(
                models, path, tolerance=atol, rtol=rtol, external=plan.external_data, names=names, quantize=quant
            )
        elif plan.adapters == "swappable":
            result = export_swappable(
                models[0], path, tolerance=atol, rtol=rtol, external=plan.external_data, quantize=quant
            )
        else:
            m = models[0]
            result = export_onnx(
                m.gm, m.signature, path, tolerance=atol, rtol=rtol, manifest=m.manifest, external=plan.external_data,
                quantize=quant,
            )  # fmt: skip
    data = result.to_json()
    triton: list[str] = []
    if plan.triton is not None:
        with step(f"write the Triton repository {plan.triton.repo}"):
            triton = data["triton"] = _triton(plan, path, models)
    return Exported(plan, path, data, result, triton=triton)


def _speech(plan: ExportPlan, path: Path, model: Any, atol: float, rtol: float, step: Step) -> Exported:
    """A speech recognizer: its encoder and decoder graphs, baked or with adapter slots (exporters/speech.py)."""
    if plan.adapters == "routed" or plan.triton is not None or plan.quantization is not None:
        raise SurgeryError(
            f"--task {SPEECH_RECOGNITION}: this export writes the encoder and decoder pair, baked or --swappable; "
            "drop --route, --triton-repo and --quantize"
        )
    with step(f"export {path} as its encoder and decoder, and check both against torch"):
        how = export_speech_swappable if plan.adapters == "swappable" else export_speech
        result = how(model, path, tolerance=atol, rtol=rtol, external=plan.external_data)
    return Exported(plan, path, result.to_json(), result, speech=True)


def _streamed(plan: ExportPlan, step: Step) -> Exported:
    """Capture without weights, insert, write the pair from the checkpoint's shards (or the .pt2's weight records),
    verify per block; swappable: adapter slots, and the model's own adapters as a pack beside the pair
    (NAME.onnx_adapter)."""
    source = plan.source
    assert source is not None  # the plan's validation refuses a streamed export of no source
    if is_speech_source(source, plan.reading.task):
        raise SurgeryError(
            f"--stream {source}: an {SPEECH_RECOGNITION} model is exported in memory as its encoder and decoder "
            "pair, not streamed; drop --stream"
        )
    archive = Path(source).is_file()
    insert = plan.insert
    spec = parse_spec(insert.method, insert.r, insert.act, insert.targets, insert.alpha) if insert else None
    swappable = plan.adapters == "swappable"
    if swappable and insert is not None and insert.method not in PACKABLE:
        raise SurgeryError(
            f"--stream --swappable --method {insert.method}: slots hold bottleneck adapters ({', '.join(PACKABLE)}); "
            "choose one of them, or drop --swappable for a baked export"
        )
    path = check_output(plan.output or default_output(source, plan.suffix))
    with step(f"{'open' if archive else 'capture'} {source} without its weights"):
        captured = (
            capture_pt2_meta(source, plan.reading.trust)
            if archive
            else capture_meta(source, dtype=plan.dtype, task=plan.reading.task)
        )
    if archive:
        _same_as_archive(captured, source, plan.dtype, plan.reading.task)
    pack = check_output(pack_beside(path, captured.dtype)) if swappable else None
    if spec is not None:
        assert insert is not None
        with step(f"insert {insert.method} adapters, r={insert.r}"):
            report = adapt(captured, spec)
        captured.manifest = adapted_manifest(captured, spec, report)
    quant = plan.quantization
    if quant is None:
        atol, rtol = tolerances(captured.dtype, plan.atol, plan.rtol)
    else:
        atol, rtol = quant.tolerances(plan.atol, plan.rtol, tolerances(captured.dtype))
    kind = f" (int{quant.bits} base)" if quant else ""
    gigabytes = captured.checkpoint.bytes() / 1e9
    with step(f"stream {gigabytes:.2f} GB of weights into {path}.data{kind}, verify block by block"):
        result = export_streamed(
            captured, path, swappable=swappable, pack=pack, tolerance=atol, rtol=rtol, quantize=quant
        )
    return Exported(plan, path, result.to_json(), result)


def _same_as_archive(captured: Any, source: str, dtype: str, task: str | None) -> None:
    """A .pt2 keeps the dtype and the head it was captured with: --dtype and --task may only repeat them."""
    from surgery.load import DTYPE_NAMES

    own = DTYPE_NAMES.get(captured.dtype, str(captured.dtype))
    if dtype not in ("auto", own):
        raise SurgeryError(
            f"--dtype {dtype}: {source} holds {own} weights and a .pt2 keeps its dtype; drop --dtype, or insert "
            f"into the base model again with --dtype {dtype}"
        )
    if task is not None and task != captured.task:
        raise SurgeryError(
            f"--task {task}: {source} was captured as {captured.task} and a .pt2 keeps its head; drop --task, or "
            f"insert into the base model again with --task {task}"
        )


def _trt(plan: ExportPlan, step: Step) -> Exported:
    """The TensorRT-ready ONNX and trtexec command, then the engine; without TensorRT, `Exported.missing` says why
    (the command prints what was written, then raises it)."""
    engine = plan.engine
    assert engine is not None
    swappable = plan.adapters == "swappable"
    shapes = list(engine.shapes) if engine.shapes is not None else None
    path = check_output(plan.output or default_output(plan.source, plan.suffix))
    parse_profiles(shapes, (ONE, PREFILL, DECODE))  # its syntax, before the model loads
    with step(f"load {plan.source or 'minilm'}"):
        captured = _open(plan, plan.source)
    atol, rtol = tolerances(weights_dtype(captured.gm), plan.atol, plan.rtol)
    with step("export the TensorRT-ready ONNX and check it against torch"):
        prepared = prepare_trt(
            captured, path, precision=engine.precision, shapes=shapes, max_r=engine.max_r,
            timing_cache=engine.timing_cache, tolerance=atol, rtol=rtol, external=plan.external_data,
        )  # fmt: skip
    name = path.name.split(".")[0]
    try:
        with step(f"build {path} ({engine.precision}{', refittable' if swappable else ''})"):
            sidecar = build_engine(prepared)
    except TensorRTMissing as missing:
        data = {**prepared.to_json(), "engine_built": False}
        if plan.triton is not None:
            config = write_triton_repo(plan.triton.repo, prepared.onnx, prepared.onnx, captured.signature, name).config
            data["triton"] = str(config)
        return Exported(plan, path, data, prepared, missing=missing)
    data = {**prepared.to_json(), "engine_built": True, "sidecar": sidecar}
    if plan.triton is not None:
        data["triton"] = str(write_triton_repo(plan.triton.repo, path, prepared.onnx, captured.signature, name).config)
    return Exported(plan, path, data, prepared)


def _fused_pt2(plan: ExportPlan, step: Step) -> Exported:
    """A torch.export program whose bottlenecks are one Triton kernel each, checked against the adapted model."""
    path = check_output(plan.output or default_output(plan.source, plan.suffix))
    with step(f"load {plan.source or 'minilm'}"):
        captured = _open(plan, plan.source, dtype=False)
    atol, rtol = tolerances(weights_dtype(captured.gm), plan.atol, plan.rtol)
    with step(f"export {path} and check it against the adapted model"):
        result = export_kernel_program(captured, path, tolerance=atol, rtol=rtol)
    return Exported(plan, path, result.to_json(), result)


def adapter_name(source: str | None) -> str:
    """The name a routed model's adapter is asked for by: the file name without its suffixes (a.adapted.pt2: a)."""
    return (source or "minilm").replace("\\", "/").rsplit("/", 1)[-1].split(".")[0]


def _triton(plan: ExportPlan, path: Path, models: list[Any]) -> list[str]:
    """The ONNX Runtime-backend model (plain and routed exports: Triton's backend cannot feed a swappable export's
    adapter slots) and the Python-backend one; the config files written."""
    assert plan.triton is not None
    repo, env = plan.triton.repo, plan.triton.env
    name = path.name.split(".")[0]
    signature = models[0].signature
    written = []
    if plan.adapters == "routed":
        names = [adapter_name(s) for s in plan.sources]
        written.append(write_triton_repo(repo, path, path, signature, name, adapters=names).config)
        written.append(
            write_python_model(repo, path, signature, name, "routed", adapters=names, execution_env=env).config
        )
    elif plan.adapters == "swappable":
        m = models[0]
        own = {adapter_name(plan.source): pack_from_model(m.gm.state_dict(), m.manifest)}
        model = write_python_model(repo, path, signature, name, "swappable", packs=own, execution_env=env)
        written.append(model.config)
    else:
        written.append(write_triton_repo(repo, path, path, signature, name).config)
        written.append(write_python_model(repo, path, signature, name, "plain", execution_env=env).config)
    return [str(c) for c in written]
