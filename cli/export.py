"""`surgery export`: adapted (or base) models to ONNX, verified against torch before anything is written.

ONNX is the format unless `--fused-pt2` names another; `--onnx` says so explicitly.
Baked (default): adapter weights as initializers. `--swappable`: adapter slots that packs fill at run time.
`--route`: several adapted models' adapters in one graph, chosen per batch row by an `adapter_id` input.
`--fused-pt2`: not ONNX but a torch.export program whose bottlenecks are one Triton kernel each on CUDA.
`--quantize int4|int8`: any ONNX kind above on a quantized base, its adapters float (exporters/quantize.py).
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import emit_json, err, out, renamed, step
from cli.options import (
    ATOL_HELP,
    RTOL_HELP,
    Act,
    Alpha,
    Dtype,
    InputDtype,
    InputShape,
    Json,
    OldShapes,
    OldTolerance,
    Output,
    Rank,
    Targets,
    Task,
    Trust,
    in_panel,
)
from exporters.budget import BUDGET_ENV, estimate
from exporters.kernel_program import export_kernel_program
from exporters.onnx import export_onnx
from exporters.onnx_files import THRESHOLD_ENV, onnx_files, onnx_size
from exporters.speech import export_speech, export_speech_swappable
from exporters.stream import export_streamed, pack_beside
from exporters.swappable import export_routed, export_swappable
from exporters.tensorrt import TensorRTMissing, build_engine, prepare_trt
from exporters.trt_profiles import DECODE, ONE, PREFILL, parse_profiles
from exporters.triton import write_python_model, write_triton_repo
from surgery.errors import SurgeryError
from surgery.io import check_output
from surgery.packs import PACKABLE, pack_from_model
from surgery.parity import tolerances, weights_dtype
from surgery.adapters import parse_spec
from surgery.bundle import adapted_manifest
from surgery.archive import capture_pt2_meta
from surgery.meta import capture_meta
from surgery.pipeline import adapt, default_output, open_model
from surgery.speech import is_speech_source
from surgery.task_names import SPEECH_RECOGNITION

Sources = Annotated[
    Optional[list[str]],
    typer.Argument(help="The model to export (default minilm); with --route, two or more .adapted.pt2 files."),
]

# the help panels of `surgery export --help`
FORMAT, CHECK, ENGINE, STREAM, MODEL, OUTPUT, QUANT = (
    "What to write",
    "Check against torch",
    "TensorRT engine (--trt)",
    "Past memory (--stream)",
    "Reading the model",
    "Output",
    "Quantized base (--quantize)",
)


def export(
    sources: Sources = None,
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx", rich_help_panel=FORMAT, help="ONNX: the format unless --fused-pt2 (--trt adds an engine)."
        ),
    ] = False,
    swappable: Annotated[
        bool, typer.Option("--swappable", rich_help_panel=FORMAT, help="Adapter slots for packs, chosen per run.")
    ] = False,
    route: Annotated[
        bool,
        typer.Option(
            "--route", rich_help_panel=FORMAT, help="Stack several models' adapters; adapter_id input per row."
        ),
    ] = False,
    fused_pt2: Annotated[
        bool,
        typer.Option(
            "--fused-pt2",
            rich_help_panel=FORMAT,
            help="A .pt2 for torch on CUDA: one Triton kernel per bottleneck (replay it in a CUDA graph).",
        ),
    ] = False,
    output: in_panel(Output, OUTPUT) = None,
    atol: Annotated[
        Optional[float],
        typer.Option("--atol", rich_help_panel=CHECK, help=f"Accept {ATOL_HELP} (default 1e-4; fp16 1e-3, bf16 1e-2)."),
    ] = None,
    rtol: Annotated[
        Optional[float],
        typer.Option("--rtol", rich_help_panel=CHECK, help=f"Accept {RTOL_HELP} (default 1e-4; fp16 1e-2, bf16 5e-2)."),
    ] = None,
    tolerance: OldTolerance = None,
    trt: Annotated[
        bool,
        typer.Option(
            "--trt",
            rich_help_panel=FORMAT,
            help="TensorRT engine (-o X.plan); without TensorRT: the ONNX and trtexec command, exit 2.",
        ),
    ] = False,
    shapes: Annotated[
        Optional[list[str]],
        typer.Option(
            "--engine-shape",
            rich_help_panel=ENGINE,
            help="Engine profile per axis, e.g. batch=1:8:64,seq=16:128:512 (MIN:OPT:MAX). A causal LM's cache graph "
            "has two profiles: prefill (past 0) and decode (seq 1); prefix one with prefill: or decode:, repeat it.",
        ),
    ] = None,
    old_shapes: OldShapes = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", rich_help_panel=ENGINE, help="Engine in fp16 (tolerance 2e-2).")
    ] = False,
    bf16: Annotated[
        bool, typer.Option("--bf16", rich_help_panel=ENGINE, help="Engine in bf16 (tolerance 1e-1).")
    ] = False,
    max_r: Annotated[
        Optional[int],
        typer.Option("--max-r", rich_help_panel=ENGINE, help="With --trt --swappable: the refittable adapter rank."),
    ] = None,
    timing_cache: Annotated[
        Optional[str],
        typer.Option("--timing-cache", rich_help_panel=ENGINE, help="Timing cache file, reused by later builds."),
    ] = None,
    triton_repo: Annotated[
        Optional[str],
        typer.Option("--triton-repo", rich_help_panel=OUTPUT, help="Also write a Triton model repository here."),
    ] = None,
    triton_env: Annotated[
        Optional[str],
        typer.Option(
            "--triton-env",
            rich_help_panel=OUTPUT,
            help="With --triton-repo: the Python environment (folder or conda-pack/venv-pack archive, with numpy "
            "and onnxruntime) the Python-backend models run in: their EXECUTION_ENV_PATH.",
        ),
    ] = None,
    external_data: Annotated[
        bool,
        typer.Option(
            "--external-data",
            rich_help_panel=OUTPUT,
            help=f"Tensors in NAME.onnx.data beside NAME.onnx (always past 2 GB; ${THRESHOLD_ENV} sets the bytes).",
        ),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            rich_help_panel=STREAM,
            help="A Hugging Face folder or a .pt2 past memory: captured without weights, its weights streamed into "
            "NAME.onnx.data tensor by tensor, verified block by block. Taken by itself where the in-memory export "
            f"would not fit (${BUDGET_ENV} sets the bytes it may use).",
        ),
    ] = False,
    method: Annotated[
        Optional[str],
        typer.Option(
            "--method",
            rich_help_panel=STREAM,
            help="With --stream: insert these adapters first (as `surgery insert` does).",
        ),
    ] = None,
    r: in_panel(Rank, STREAM) = "8",
    act: in_panel(Act, STREAM) = "relu",
    targets: in_panel(Targets, STREAM) = None,
    alpha: in_panel(Alpha, STREAM) = None,
    trust: in_panel(Trust, MODEL) = False,
    input_shape: in_panel(InputShape, MODEL) = None,
    input_dtype: in_panel(InputDtype, MODEL) = "float32",
    dtype: in_panel(Dtype, MODEL) = "auto",
    task: in_panel(Task, MODEL) = None,
    json: in_panel(Json, OUTPUT) = False,
    quantize: Annotated[
        Optional[str],
        typer.Option(
            "--quantize",
            rich_help_panel=QUANT,
            help="int4 or int8: the base model's MatMul weights as MatMulNBits blocks (ONNX Runtime's quantizer); "
            "adapters, slots and routed stacks stay float. Checked against torch with the same quantized weights.",
        ),
    ] = None,
    block_size: Annotated[
        int, typer.Option("--block-size", rich_help_panel=QUANT, help="Weight rows per scale (a power of two, >= 16).")
    ] = 32,
    accuracy_level: Annotated[
        int,
        typer.Option(
            "--accuracy-level",
            rich_help_panel=QUANT,
            help="MatMulNBits compute: 0 unset (fp32 on CPU), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations "
            "(fastest on CPU; checked at --atol 1e-2 --rtol 1e-1, and its weights again at fp32 compute).",
        ),
    ] = 0,
    asymmetric: Annotated[
        bool,
        typer.Option("--asymmetric", rich_help_panel=QUANT, help="Unsigned blocks with zero points (default signed)."),
    ] = False,
    quant_algorithm: Annotated[
        str,
        typer.Option(
            "--quant-algorithm",
            rich_help_panel=QUANT,
            help="default (ONNX Runtime's min/max rounding), hqq, rtn or k_quant (int4 only): none needs data.",
        ),
    ] = "default",
    float_head: Annotated[
        bool,
        typer.Option(
            "--float-head", rich_help_panel=QUANT, help="Keep the MatMul that writes an output (lm_head) float."
        ),
    ] = False,
) -> None:
    """Export to ONNX with dynamic batch and sequence; written only if ONNX Runtime matches torch."""
    sources = sources or [None]
    tolerance = renamed(atol, tolerance, "--atol", "--tolerance")
    shapes = renamed(shapes, old_shapes, "--engine-shape", "--shapes")
    quant = None
    if quantize is not None:
        from exporters.quantize import Quantization

        quant = Quantization.named(
            quantize,
            block_size=block_size,
            accuracy_level=accuracy_level,
            symmetric=not asymmetric,
            algorithm=quant_algorithm,
            head=not float_head,
        )
        if trt or fused_pt2 or triton_repo:
            raise SurgeryError(
                "--quantize writes a baked, --swappable, --route or --stream ONNX; drop --trt, --fused-pt2 and "
                "--triton-repo, or drop --quantize"
            )
    elif (block_size, accuracy_level, asymmetric, quant_algorithm, float_head) != (32, 0, False, "default", False):
        raise SurgeryError(
            "--block-size, --accuracy-level, --asymmetric, --quant-algorithm and --float-head set --quantize; add "
            "--quantize int4 (or int8)"
        )
    if stream:
        if is_speech_source(sources[0], task):
            raise SurgeryError(
                f"--stream {sources[0]}: an {SPEECH_RECOGNITION} model is exported in memory as its encoder and "
                "decoder pair, not streamed; drop --stream"
            )
        if route:
            raise SurgeryError(
                "--stream --route: routing stacks the adapters of several .adapted.pt2 files, which --stream cannot "
                "open (it reads one Hugging Face folder); export --stream --swappable and load a pack per request, "
                "or drop --stream"
            )
        if trt or fused_pt2 or triton_repo or len(sources) > 1:
            raise SurgeryError(
                "--stream writes a baked or --swappable ONNX of one Hugging Face folder or .pt2; --trt, --fused-pt2 "
                "and --triton-repo take models in memory: drop them, or drop --stream"
            )
        return _export_streamed(
            sources[0], output, method, r, act, targets, alpha, dtype, task, tolerance, rtol, json, swappable, trust,
            quant,
        )  # fmt: skip
    if method is not None:
        raise SurgeryError(f"--method {method}: export inserts adapters with --stream only; run `surgery insert` first")
    if swappable and route:
        raise SurgeryError("--swappable and --route are two kinds of export; choose one")
    if len(sources) > 1 and not route:
        raise SurgeryError(f"{len(sources)} models given; export takes one, or several with --route")
    if trt:
        opener = lambda: open_model(  # noqa: E731
            sources[0], trust=trust, input_shapes=input_shape, input_dtype=input_dtype, dtype=dtype, task=task
        )
        return _export_trt(
            sources[0], opener, output, swappable, route, shapes, fp16, bf16, max_r, timing_cache, triton_repo,
            tolerance, rtol, json, external_data,
        )  # fmt: skip
    if shapes or fp16 or bf16 or max_r is not None or timing_cache:
        raise SurgeryError("--engine-shape, --fp16, --bf16, --max-r and --timing-cache are engine options; add --trt")
    if fused_pt2:
        if onnx:
            raise SurgeryError("--onnx and --fused-pt2 are two output formats; choose one")
        if swappable or route or triton_repo:
            raise SurgeryError(
                "--fused-pt2 writes a torch program; --swappable, --route and --triton-repo are ONNX exports"
            )
        return _export_fused_pt2(sources[0], output, tolerance, rtol, trust, input_shape, input_dtype, task, json)
    if triton_env and not triton_repo:
        raise SurgeryError("--triton-env names the Triton models' Python environment; give --triton-repo too")
    if triton_repo and Path(triton_repo).exists() and not Path(triton_repo).is_dir():
        raise SurgeryError(f"--triton-repo {triton_repo}: exists and is not a folder; name a folder (it is created)")
    if not route and not triton_repo and input_shape is None and sources[0] is not None:
        fit = estimate(sources[0], dtype)
        if fit is not None and not fit.fits:
            if is_speech_source(sources[0], task):
                raise SurgeryError(
                    f"{sources[0]}: {fit.line().split(': streaming', 1)[0]}, and an {SPEECH_RECOGNITION} model cannot "
                    f"be streamed; free memory, or set {BUDGET_ENV} higher if the estimate is too cautious"
                )
            err.print(f"{sources[0]}: {fit.line()}", soft_wrap=True)
            return _export_streamed(
                sources[0], output, None, r, act, targets, alpha, dtype, task, tolerance, rtol, json, swappable, trust,
                quant,
            )  # fmt: skip
    suffix = ".routed.onnx" if route else ".swappable.onnx" if swappable else ".onnx"
    path = check_output(output or default_output(sources[0], suffix))
    with step(f"load {', '.join(s or 'minilm' for s in sources)}"):
        models = [
            open_model(s, trust=trust, input_shapes=input_shape, input_dtype=input_dtype, dtype=dtype, task=task)
            for s in sources
        ]
    if quant is None:
        tolerance, rtol = tolerances(weights_dtype(models[0].gm), tolerance, rtol)
    else:
        if models[0].source.path.endswith(".gguf"):  # its Q4_0 / Q8_0 blocks carried (exporters/gguf_carry.py)
            quant = dataclasses.replace(quant, gguf=models[0].source.path)
        tolerance, rtol = quant.tolerances(tolerance, rtol, tolerances(weights_dtype(models[0].gm)))
    if models[0].task == SPEECH_RECOGNITION:
        return _export_speech(models[0], path, swappable, route or bool(triton_repo) or quant is not None, tolerance,
                              rtol, external_data, json)  # fmt: skip
    kind = f" ({quantize} base)" if quant else ""
    with step(f"export {path}{kind} and check it against torch"):
        if route:
            names = [adapter_name(s) for s in sources]
            result = export_routed(
                models, path, tolerance=tolerance, rtol=rtol, external=external_data, names=names, quantize=quant
            )
        elif swappable:
            result = export_swappable(
                models[0], path, tolerance=tolerance, rtol=rtol, external=external_data, quantize=quant
            )
        else:
            m = models[0]
            result = export_onnx(
                m.gm, m.signature, path, tolerance=tolerance, rtol=rtol, manifest=m.manifest, external=external_data,
                quantize=quant,
            )  # fmt: skip
    data = result.to_json()
    if triton_repo:
        with step(f"write the Triton repository {triton_repo}"):
            data["triton"] = _triton(triton_repo, path, sources, models, route, swappable, triton_env)
    if json:
        emit_json(data)
        return
    out.print(f"wrote {' + '.join(map(str, onnx_files(path)))} ({onnx_size(path) / 1e6:.1f} MB)")
    same = " with the same quantized weights" if quant else ""
    out.print(
        f"max |ORT - torch{same}| = {data['max_abs_diff']:.2e}, {data['max_rel_diff']:.2e} of max|torch| "
        f"(--atol {data['tolerance']:g} + --rtol {data['rtol']:g} x max|torch|)"
    )
    if quant:
        q = data["quantization"]
        out.print(
            f"{q['quantized_matmuls']} MatMuls quantized to {quantize} (block {q['block_size']}, accuracy level "
            f"{q['accuracy_level']}, {q['algorithm']}); {q['adapter_tensors_float']} adapter tensors float; "
            f"max |ORT - float torch| = {q['from_float']['max_abs_diff']:.2e}, "
            f"{q['from_float']['max_rel_diff']:.2e} of max|torch| (measured, not checked)"
        )
        if "gguf" in q:
            out.print(q["gguf"]["summary"])
    if swappable:
        out.print(
            f"{data['adapter_tensors']} adapter slots; no pack = base model, own pack = adapted model: both checked"
        )
    if route:
        out.print(
            f"{len(data['route'])} adapters stacked at rank {data['padded_rank']}; "
            f"rows checked with ids {data['checked_ids']}"
        )
        table = ", ".join(f"{i} {n}" for i, n in data["adapter_ids"].items())
        out.print(f"adapter_id: {table}; any other id runs the base model")
    for config in data.get("triton", []):
        out.print(f"wrote {config}")
    if triton_repo:
        out.print(f"serve it with: surgery serve {triton_repo}")


def _export_speech(model, path, swappable, other_form, tolerance, rtol, external, json) -> None:
    """A speech recognizer: its encoder and decoder graphs, baked or with adapter slots (exporters/speech.py)."""
    if other_form:
        raise SurgeryError(
            f"--task {SPEECH_RECOGNITION}: this export writes the encoder and decoder pair, baked or --swappable; "
            "drop --route, --triton-repo and --quantize"
        )
    with step(f"export {path} as its encoder and decoder, and check both against torch"):
        how = export_speech_swappable if swappable else export_speech
        result = how(model, path, tolerance=tolerance, rtol=rtol, external=external)
    data = result.to_json()
    if json:
        emit_json(data)
        return
    for part in (result.encoder, result.decoder):
        out.print(f"wrote {' + '.join(map(str, onnx_files(part.path)))} ({onnx_size(part.path) / 1e6:.1f} MB)")
    out.print(
        f"max |ORT - torch| = {data['max_abs_diff']:.2e}, {data['max_rel_diff']:.2e} of max|torch| "
        f"(--atol {data['tolerance']:g} + --rtol {data['rtol']:g} x max|torch|)"
    )
    if swappable:
        out.print("adapter slots in each graph; no pack = base model, own pack = adapted model: both checked")
        out.print(f"transcribe with: surgery generate {result.decoder.path} --features FEATURES.npy --adapter PACK")
    else:
        out.print(f"transcribe with: surgery generate {result.decoder.path} --features FEATURES.npy")


def _export_streamed(
    source, output, method, r, act, targets, alpha, dtype, task, tolerance, rtol, json, swappable=False, trust=False,
    quant=None,
) -> None:  # fmt: skip
    """--stream: capture without weights, insert, write the pair from the checkpoint's shards (or the .pt2's weight
    records), verify per block; --swappable: adapter slots, and the model's own adapters as a pack beside the pair
    (NAME.onnx_adapter)."""
    if source is None:
        raise SurgeryError(
            "--stream takes a Hugging Face folder (config.json and safetensors weights) or a .pt2; name it"
        )
    archive = Path(source).is_file()
    if swappable and method is None and not archive:
        raise SurgeryError(
            "--stream --swappable makes slots for the adapters it inserts; add --method houlsby (or pfeiffer)"
        )
    spec = parse_spec(method, r, act, targets, alpha) if method else None
    if swappable and method is not None and method not in PACKABLE:
        raise SurgeryError(
            f"--stream --swappable --method {method}: slots hold bottleneck adapters ({', '.join(PACKABLE)}); "
            "choose one of them, or drop --swappable for a baked export"
        )
    path = check_output(output or default_output(source, ".swappable.onnx" if swappable else ".onnx"))
    with step(f"{'open' if archive else 'capture'} {source} without its weights"):
        captured = capture_pt2_meta(source, trust) if archive else capture_meta(source, dtype=dtype, task=task)
    if archive:
        _same_as_archive(captured, source, dtype, task)
    pack = check_output(pack_beside(path, captured.dtype)) if swappable else None
    if spec is not None:
        with step(f"insert {method} adapters, r={r}"):
            report = adapt(captured, spec)
        captured.manifest = adapted_manifest(captured, spec, report)
    if quant is None:
        tolerance, rtol = tolerances(captured.dtype, tolerance, rtol)
    else:
        tolerance, rtol = quant.tolerances(tolerance, rtol, tolerances(captured.dtype))
    kind = f" (int{quant.bits} base)" if quant else ""
    with step(
        f"stream {captured.checkpoint.bytes() / 1e9:.2f} GB of weights into {path}.data{kind}, verify block by block"
    ):
        result = export_streamed(
            captured, path, swappable=swappable, pack=pack, tolerance=tolerance, rtol=rtol, quantize=quant
        )
    if json:
        emit_json(result.to_json())
        return
    out.print(f"wrote {' + '.join(map(str, onnx_files(path)))} ({onnx_size(path) / 1e6:.1f} MB)")
    if result.no_pack is not None:
        out.print(f"{result.slots} adapter slots; no pack = base model: {result.no_pack.summary()}")
        out.print(f"own pack {result.pack} = adapted model, block by block:")
    assert result.blocks is not None
    out.print(result.blocks.markdown(), soft_wrap=True)
    out.print(result.blocks.summary())
    if result.quantization is not None:
        q = result.quantization.to_json()
        out.print(
            f"{q['quantized_matmuls']} MatMuls quantized to int{q['bits']} as they were written (block "
            f"{q['block_size']}, accuracy level {q['accuracy_level']}, {q['algorithm']}); {q['adapter_tensors_float']} "
            "adapter tensors float; checked block by block against torch with the same quantized weights"
        )


def _same_as_archive(captured, source, dtype, task) -> None:
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


def adapter_name(source: str | None) -> str:
    """The name a routed model's adapter is asked for by: the file name without its suffixes (a.adapted.pt2: a)."""
    return (source or "minilm").replace("\\", "/").rsplit("/", 1)[-1].split(".")[0]


def _triton(repo, path, sources, models, route, swappable, env=None) -> list[str]:
    """The ONNX Runtime-backend model (plain and routed exports: Triton's backend cannot feed a swappable export's
    adapter slots) and the Python-backend one; the config files written."""
    name = path.name.split(".")[0]
    signature = models[0].signature
    written = []
    if route:
        names = [adapter_name(s) for s in sources]
        written.append(write_triton_repo(repo, path, path, signature, name, adapters=names).config)
        written.append(
            write_python_model(repo, path, signature, name, "routed", adapters=names, execution_env=env).config
        )
    elif swappable:
        m = models[0]
        own = {adapter_name(sources[0]): pack_from_model(m.gm.state_dict(), m.manifest)}
        model = write_python_model(repo, path, signature, name, "swappable", packs=own, execution_env=env)
        written.append(model.config)
    else:
        written.append(write_triton_repo(repo, path, path, signature, name).config)
        written.append(write_python_model(repo, path, signature, name, "plain", execution_env=env).config)
    return [str(c) for c in written]


def _export_fused_pt2(source, output, tolerance, rtol, trust, input_shape, input_dtype, task, json) -> None:
    path = check_output(output or default_output(source, ".fused.pt2"))
    with step(f"load {source or 'minilm'}"):
        captured = open_model(source, trust=trust, input_shapes=input_shape, input_dtype=input_dtype, task=task)
    tolerance, rtol = tolerances(weights_dtype(captured.gm), tolerance, rtol)
    with step(f"export {path} and check it against the adapted model"):
        result = export_kernel_program(captured, path, tolerance=tolerance, rtol=rtol)
    if json:
        emit_json(result.to_json())
        return
    out.print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {result.kernels} bottlenecks, "
        "one surgery::bottleneck op each"
    )
    p = result.parity
    out.print(
        f"max |fused - adapted| = {p.max_abs_diff:.2e}, {p.max_rel_diff:.2e} of max|torch| (--atol {p.atol:g} "
        f"+ --rtol {p.rtol:g} x max|torch|); load it after `import surgery.kernels`"
    )


def _export_trt(
    source, opener, output, swappable, route, shapes, fp16, bf16, max_r, timing_cache, triton_repo, tolerance, rtol,
    json, external_data=False,
) -> None:  # fmt: skip
    """--trt: the TensorRT-ready ONNX and trtexec command, then the engine (exit 2 where TensorRT is missing)."""
    if route:
        raise SurgeryError("--route exports ONNX only; TensorRT engines are baked or --swappable")
    if fp16 and bf16:
        raise SurgeryError("--fp16 and --bf16 are two precisions; choose one")
    if swappable != (max_r is not None):
        raise SurgeryError(
            "a refittable engine takes both --swappable and --max-r R (the largest adapter rank it will hold)"
        )
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    path = check_output(output or default_output(source, ".refit.plan" if swappable else ".plan"))
    parse_profiles(shapes, (ONE, PREFILL, DECODE))  # its syntax, before the model loads
    with step(f"load {source or 'minilm'}"):
        captured = opener()
    tolerance, rtol = tolerances(weights_dtype(captured.gm), tolerance, rtol)
    with step("export the TensorRT-ready ONNX and check it against torch"):
        plan = prepare_trt(
            captured, path, precision=precision, shapes=shapes, max_r=max_r, timing_cache=timing_cache,
            tolerance=tolerance, rtol=rtol, external=external_data,
        )  # fmt: skip
    name = path.name.split(".")[0]
    try:
        with step(f"build {path} ({precision}{', refittable' if swappable else ''})"):
            sidecar = build_engine(plan)
    except TensorRTMissing:
        data = {**plan.to_json(), "engine_built": False}
        if triton_repo:
            data["triton"] = str(write_triton_repo(triton_repo, plan.onnx, plan.onnx, captured.signature, name).config)
        if json:
            emit_json(data)
        else:
            out.print(f"wrote {plan.onnx} (max |ORT - torch| = {plan.parity.max_abs_diff:.2e}) and {plan.command_file}")
            out.print("build the engine where TensorRT is installed with:")
            out.print(plan.trtexec(), soft_wrap=True, markup=False)
        raise
    data = {**plan.to_json(), "engine_built": True, "sidecar": sidecar}
    if triton_repo:
        data["triton"] = str(write_triton_repo(triton_repo, path, plan.onnx, captured.signature, name).config)
    if json:
        emit_json(data)
        return
    out.print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), TensorRT {sidecar['tensorrt']} on {sidecar['gpu']}, "
        f"sidecar {path}.json"
    )
