"""`surgery export`: adapted (or base) models to ONNX, verified against torch before anything is written.

ONNX is the format unless `--fused-pt2` names another; `--onnx` says so explicitly.
Baked (default): adapter weights as initializers. `--swappable`: adapter slots that packs fill at run time.
`--route`: several adapted models' adapters in one graph, chosen per batch row by an `adapter_id` input.
`--fused-pt2`: not ONNX but a torch.export program whose bottlenecks are one Triton kernel each on CUDA.
`--quantize int4|int8`: any ONNX kind above, streamed too, on a quantized base, its adapters float
(exporters/quantize.py, exporters/stream_quant.py). A speech recognizer is written as its encoder and decoder pair.
"""

from __future__ import annotations

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
from exporters.budget import BUDGET_ENV
from exporters.onnx_files import THRESHOLD_ENV, onnx_files, onnx_size
from exporters.pipeline import Exported, run_plan
from exporters.plan import ExportOptions, ExportPlan

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
    options = ExportOptions(
        sources=tuple(sources or [None]),
        onnx=onnx,
        swappable=swappable,
        route=route,
        fused_pt2=fused_pt2,
        output=output,
        atol=renamed(atol, tolerance, "--atol", "--tolerance"),
        rtol=rtol,
        trt=trt,
        engine_shapes=_tuple(renamed(shapes, old_shapes, "--engine-shape", "--shapes")),
        fp16=fp16,
        bf16=bf16,
        max_r=max_r,
        timing_cache=timing_cache,
        triton_repo=triton_repo,
        triton_env=triton_env,
        external_data=external_data,
        stream=stream,
        method=method,
        r=r,
        act=act,
        targets=targets,
        alpha=alpha,
        trust=trust,
        input_shape=_tuple(input_shape),
        input_dtype=input_dtype,
        dtype=dtype,
        task=task,
        quantize=quantize,
        block_size=block_size,
        accuracy_level=accuracy_level,
        asymmetric=asymmetric,
        quant_algorithm=quant_algorithm,
        float_head=float_head,
    )
    done = run_plan(ExportPlan.from_options(options), step=step, note=lambda text: err.print(text, soft_wrap=True))
    if json:
        emit_json(done.data)
    else:
        SUMMARIES[done.plan.mode](done)
    if done.missing is not None:
        raise done.missing


def _tuple(values: list[str] | None) -> tuple[str, ...] | None:
    return tuple(values) if values is not None else None


def _onnx_summary(done: Exported) -> None:
    if done.speech:
        return _speech_summary(done)
    plan, data, path = done.plan, done.data, done.path
    quant = plan.quantization
    out.print(f"wrote {' + '.join(map(str, onnx_files(path)))} ({onnx_size(path) / 1e6:.1f} MB)")
    same = " with the same quantized weights" if quant else ""
    out.print(
        f"max |ORT - torch{same}| = {data['max_abs_diff']:.2e}, {data['max_rel_diff']:.2e} of max|torch| "
        f"(--atol {data['tolerance']:g} + --rtol {data['rtol']:g} x max|torch|)"
    )
    if quant:
        q = data["quantization"]
        out.print(
            f"{q['quantized_matmuls']} MatMuls quantized to int{quant.bits} (block {q['block_size']}, accuracy level "
            f"{q['accuracy_level']}, {q['algorithm']}); {q['adapter_tensors_float']} adapter tensors float; "
            f"max |ORT - float torch| = {q['from_float']['max_abs_diff']:.2e}, "
            f"{q['from_float']['max_rel_diff']:.2e} of max|torch| (measured, not checked)"
        )
        if "gguf" in q:
            out.print(q["gguf"]["summary"])
    if plan.adapters == "swappable":
        out.print(
            f"{data['adapter_tensors']} adapter slots; no pack = base model, own pack = adapted model: both checked"
        )
    if plan.adapters == "routed":
        out.print(
            f"{len(data['route'])} adapters stacked at rank {data['padded_rank']}; "
            f"rows checked with ids {data['checked_ids']}"
        )
        table = ", ".join(f"{i} {n}" for i, n in data["adapter_ids"].items())
        out.print(f"adapter_id: {table}; any other id runs the base model")
    for config in done.triton:
        out.print(f"wrote {config}")
    if plan.triton is not None:
        out.print(f"serve it with: surgery serve {plan.triton.repo}")


def _speech_summary(done: Exported) -> None:
    result, data = done.result, done.data
    for part in (result.encoder, result.decoder):
        out.print(f"wrote {' + '.join(map(str, onnx_files(part.path)))} ({onnx_size(part.path) / 1e6:.1f} MB)")
    out.print(
        f"max |ORT - torch| = {data['max_abs_diff']:.2e}, {data['max_rel_diff']:.2e} of max|torch| "
        f"(--atol {data['tolerance']:g} + --rtol {data['rtol']:g} x max|torch|)"
    )
    if done.plan.adapters == "swappable":
        out.print("adapter slots in each graph; no pack = base model, own pack = adapted model: both checked")
        out.print(f"transcribe with: surgery generate {result.decoder.path} --features FEATURES.npy --adapter PACK")
    else:
        out.print(f"transcribe with: surgery generate {result.decoder.path} --features FEATURES.npy")


def _streamed_summary(done: Exported) -> None:
    result, path = done.result, done.path
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


def _fused_pt2_summary(done: Exported) -> None:
    result, path = done.result, done.path
    out.print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {result.kernels} bottlenecks, "
        "one surgery::bottleneck op each"
    )
    p = result.parity
    out.print(
        f"max |fused - adapted| = {p.max_abs_diff:.2e}, {p.max_rel_diff:.2e} of max|torch| (--atol {p.atol:g} "
        f"+ --rtol {p.rtol:g} x max|torch|); load it after `import surgery.kernels`"
    )


def _trt_summary(done: Exported) -> None:
    prepared, path = done.result, done.path
    if done.missing is not None:
        diff = prepared.parity.max_abs_diff
        out.print(f"wrote {prepared.onnx} (max |ORT - torch| = {diff:.2e}) and {prepared.command_file}")
        out.print("build the engine where TensorRT is installed with:")
        out.print(prepared.trtexec(), soft_wrap=True, markup=False)
        return
    sidecar = done.data["sidecar"]
    out.print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), TensorRT {sidecar['tensorrt']} on {sidecar['gpu']}, "
        f"sidecar {path}.json"
    )


# what the command prints after each pipeline (`ExportPlan.mode`), without --json
SUMMARIES = {"onnx": _onnx_summary, "stream": _streamed_summary, "trt": _trt_summary, "fused-pt2": _fused_pt2_summary}
