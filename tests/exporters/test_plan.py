"""The export plan (exporters/plan.py): every impossible combination of `surgery export`'s options refused with its
one line, before any model is read; what passes becomes the typed plan its pipeline carries out."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from exporters.plan import REFUSALS, STREAMED, Engine, ExportOptions, ExportPlan, TritonRepo
from exporters.quantization import Quantization
from surgery.errors import SurgeryError
from tests.conftest import ROOT

Opts = ExportOptions

# options -> a fragment of the one line that refuses them; one or more cases per refusal of the table
REFUSED = [
    ("quantize engine", Opts(quantize="int8", trt=True), "drop --trt, --fused-pt2 and --triton-repo"),
    ("quantize fused", Opts(quantize="int8", fused_pt2=True), "--quantize writes a baked"),
    ("quantize triton", Opts(quantize="int4", triton_repo="repo"), "or drop --quantize"),
    ("block size alone", Opts(block_size=64), "set --quantize; add --quantize int4 (or int8)"),
    ("float head alone", Opts(float_head=True, trt=True), "set --quantize"),
    ("quantize int3", Opts(quantize="int3"), "--quantize int3: choose int4 or int8"),
    ("odd block size", Opts(quantize="int4", block_size=48), "--block-size 48: give a power of two"),
    ("int4-only algorithm", Opts(quantize="int8", quant_algorithm="rtn"), "writes int4 only"),
    ("stream route", Opts(stream=True, route=True, sources=("a", "b")), "--stream --route: routing stacks"),
    ("stream engine", Opts(stream=True, trt=True, sources=("m",)), "--stream writes a baked or --swappable ONNX"),
    ("stream fused", Opts(stream=True, fused_pt2=True, sources=("m",)), "drop them, or drop --stream"),
    ("stream triton", Opts(stream=True, triton_repo="repo", sources=("m",)), "--triton-repo take models in memory"),
    ("stream two models", Opts(stream=True, sources=("a", "b")), "of one Hugging Face folder or .pt2"),
    ("stream no source", Opts(stream=True), "--stream takes a Hugging Face folder"),
    ("stream slots, no method", Opts(stream=True, swappable=True, sources=("folder",)), "add --method houlsby"),
    ("method in memory", Opts(method="houlsby"), "--method houlsby: export inserts adapters with --stream only"),
    ("method with engine", Opts(method="lora", trt=True), "--method lora: export inserts"),
    ("swappable route", Opts(swappable=True, route=True, sources=("a", "b")), "two kinds of export; choose one"),
    ("two models", Opts(sources=("a", "b")), "2 models given; export takes one, or several with --route"),
    ("routed engine", Opts(trt=True, route=True, sources=("a", "b")), "--route exports ONNX only"),
    ("two precisions", Opts(trt=True, fp16=True, bf16=True), "--fp16 and --bf16 are two precisions"),
    ("refit without max-r", Opts(trt=True, swappable=True), "both --swappable and --max-r R"),
    ("max-r without swappable", Opts(trt=True, max_r=16), "a refittable engine takes both"),
    ("fp16 without engine", Opts(fp16=True), "are engine options; add --trt"),
    ("shape without engine", Opts(engine_shapes=("batch=1:2:4",), fused_pt2=True), "engine options; add --trt"),
    ("timing cache alone", Opts(timing_cache="tc"), "engine options"),
    ("onnx and fused", Opts(onnx=True, fused_pt2=True), "--onnx and --fused-pt2 are two output formats"),
    ("fused swappable", Opts(fused_pt2=True, swappable=True), "--fused-pt2 writes a torch program"),
    ("fused triton", Opts(fused_pt2=True, triton_repo="repo"), "--triton-repo are ONNX exports"),
    ("env without repo", Opts(triton_env="env"), "give --triton-repo too"),
]


@pytest.mark.parametrize("options, says", [pytest.param(*c[1:], id=c[0]) for c in REFUSED])
def test_each_impossible_combination_is_one_line(options, says):
    with pytest.raises(SurgeryError, match=None) as refused:
        ExportPlan.from_options(options)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_every_refusal_of_the_table_is_exercised(tmp_path):
    (tmp_path / "repo").write_text("")
    hit = set()
    for options in [c[1] for c in REFUSED] + [Opts(triton_repo=str(tmp_path / "repo"))]:
        for refusal in (*REFUSALS, *STREAMED):
            if options.mode in refusal.modes and refusal.when(options):
                hit.add(refusal.says)
                break
    assert hit == {r.says for r in (*REFUSALS, *STREAMED)}


def test_a_triton_repo_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "repo").write_text("")
    with pytest.raises(SurgeryError, match="exists and is not a folder"):
        ExportPlan.from_options(Opts(triton_repo=str(tmp_path / "repo")))
    assert ExportPlan.from_options(Opts(triton_repo=str(tmp_path / "new"))).triton == TritonRepo(str(tmp_path / "new"))


def test_a_streamed_pt2_makes_slots_without_method(tmp_path):
    (tmp_path / "m.adapted.pt2").write_bytes(b"")
    plan = ExportPlan.from_options(Opts(stream=True, swappable=True, sources=(str(tmp_path / "m.adapted.pt2"),)))
    assert (plan.mode, plan.adapters, plan.insert, plan.suffix) == ("stream", "swappable", None, ".swappable.onnx")


def test_the_first_refusal_wins():
    """Two impossible combinations at once: the user reads the one checked first (the table's order)."""
    with pytest.raises(SurgeryError, match="--quantize writes"):
        ExportPlan.from_options(Opts(quantize="int4", stream=True, trt=True, sources=("m",)))
    with pytest.raises(SurgeryError, match="--stream --route"):
        ExportPlan.from_options(Opts(stream=True, route=True, fp16=True, sources=("a", "b")))


# options -> (mode, format, adapters, suffix)
PLANS = [
    (Opts(), ("onnx", "onnx", "baked", ".onnx")),
    (Opts(onnx=True, swappable=True), ("onnx", "onnx", "swappable", ".swappable.onnx")),
    (Opts(route=True, sources=("a", "b", "c")), ("onnx", "onnx", "routed", ".routed.onnx")),
    (Opts(trt=True), ("trt", "onnx", "baked", ".plan")),
    (Opts(trt=True, swappable=True, max_r=16), ("trt", "onnx", "swappable", ".refit.plan")),
    (Opts(fused_pt2=True), ("fused-pt2", "fused-pt2", "baked", ".fused.pt2")),
    (Opts(stream=True, sources=("m",), method="houlsby"), ("stream", "onnx", "baked", ".onnx")),
    (Opts(stream=True, sources=("m",), quantize="int4"), ("stream", "onnx", "baked", ".onnx")),
    # a streamed export reads no engine, Triton or model-reading option, and leaves them alone as it always has
    (Opts(stream=True, sources=("m",), fp16=True, triton_env="e"), ("stream", "onnx", "baked", ".onnx")),
]


@pytest.mark.parametrize("options, expected", PLANS)
def test_what_passes_becomes_a_typed_plan(options, expected):
    plan = ExportPlan.from_options(options)
    assert (plan.mode, plan.format, plan.adapters, plan.suffix) == expected
    assert plan.engine is None or plan.mode == "trt"


def test_the_plan_carries_engine_quantization_insert_and_reading():
    plan = ExportPlan.from_options(
        Opts(trt=True, bf16=True, swappable=True, max_r=16, engine_shapes=("batch=1:2:4",), triton_repo="repo")
    )
    assert plan.engine == Engine("bf16", ("batch=1:2:4",), 16, None)
    assert plan.triton == TritonRepo("repo")
    plan = ExportPlan.from_options(
        Opts(quantize="int8", block_size=64, asymmetric=True, float_head=True, quant_algorithm="hqq", swappable=True)
    )
    assert plan.quantization == Quantization(bits=8, block_size=64, symmetric=False, algorithm="hqq", head=False)
    plan = ExportPlan.from_options(
        Opts(stream=True, sources=("m",), method="pfeiffer", r="4", act="gelu", dtype="fp16")
    )
    assert (plan.insert.method, plan.insert.r, plan.insert.act, plan.dtype) == ("pfeiffer", "4", "gelu", "fp16")
    plan = ExportPlan.from_options(Opts(input_shape=("batch,seq,32",), trust=True, task="causal-lm", atol=1e-3))
    assert (plan.reading.input_shape, plan.reading.trust, plan.reading.task, plan.atol) == (
        ("batch,seq,32",),
        True,
        "causal-lm",
        1e-3,
    )


def test_only_one_named_model_in_memory_may_stream_by_itself():
    assert ExportPlan.from_options(Opts(sources=("folder",))).may_stream
    assert ExportPlan.from_options(Opts(sources=("folder",), swappable=True)).may_stream
    for options in (
        Opts(),  # minilm, always in memory
        Opts(sources=("a", "b"), route=True),
        Opts(sources=("folder",), triton_repo="repo"),
        Opts(sources=("folder",), input_shape=("batch,seq,8",)),
        Opts(sources=("folder",), trt=True),
        Opts(sources=("folder",), fused_pt2=True),
    ):
        assert not ExportPlan.from_options(options).may_stream, options


def test_streaming_by_itself_keeps_the_streamed_refusals(tmp_path):
    plan = ExportPlan.from_options(Opts(sources=("folder",), quantize="int4"))
    streamed = plan.streamed()
    assert (streamed.mode, streamed.suffix, streamed.insert) == ("stream", ".onnx", None)
    assert streamed.quantization == plan.quantization  # quantized block by block as it streams
    with pytest.raises(SurgeryError, match="--stream --swappable makes slots"):
        ExportPlan.from_options(Opts(sources=(str(tmp_path),), swappable=True)).streamed()
    (tmp_path / "m.pt2").write_bytes(b"")
    assert ExportPlan.from_options(Opts(sources=(str(tmp_path / "m.pt2"),), swappable=True)).streamed().stream


def test_the_plan_is_frozen():
    plan = ExportPlan.from_options(Opts())
    with pytest.raises(AttributeError):
        plan.stream = True  # type: ignore[misc]
    assert replace(plan, output="x.onnx").output == "x.onnx"


def test_the_plan_imports_without_torch():
    code = "import sys, exporters.plan, exporters.quantization; assert 'torch' not in sys.modules, 'torch imported'"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
