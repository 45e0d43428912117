"""TensorRT export on the real MiniLM: what runs without TensorRT here (the refittable ONNX and its padding, weight
names, trtexec, check-trt, Triton; profiles are test_trt_profiles.py's), and, behind `-m trt`, engines on a GPU with
TensorRT."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporters.slots import SwappableMeta
from exporters.tensorrt import prepare_trt
from exporters.trt_profiles import DECODE, PREFILL, parse_shapes
from exporters.trt_refit import pad_pack, refit_weights, weight_names
from exporters.triton import write_triton_repo
from exporters.trt_check import check_trt
from exporters.verify import check_onnx
from surgery.errors import SurgeryError
from surgery.packs import pack_from_model
from surgery.pipeline import open_model
from tests.conftest import make_adapted

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_base):
    folder = tmp_path_factory.mktemp("trt_models")
    return [make_adapted(minilm_base, folder, 8, seed=0), make_adapted(minilm_base, folder, 4, seed=1)]


@pytest.fixture(scope="module")
def refit_plan(tmp_path_factory, models):
    """The r=8 model prepared for a refittable engine at max-r 16 (ONNX written and checked in ORT)."""
    folder = tmp_path_factory.mktemp("refit")
    return prepare_trt(models[0], folder / "m.plan", max_r=16, precision="fp16")


@pytest.mark.slow  # a capture and an export of the tiny LM
def test_cache_graph_trt_onnx_is_checked_clean_with_two_profiles(lm_base, tmp_path):
    plan = prepare_trt(lm_base("llama"), tmp_path / "lm.plan", shapes=["batch=1:1:4", "decode:past=1:64:128"])
    assert plan.parity.ok and list(plan.profiles) == [PREFILL, DECODE]
    assert plan.to_json()["profiles"][DECODE]["past_key_values.1.key"]["max"] == [4, 2, 128, 16]
    result = check_trt(plan.onnx)
    assert result.clean, [f.to_json() for f in result.errors]
    script = plan.command_file.read_text()
    assert script.count("--minShapes=") == 2 and "past_key_values.0.key:1x2x0x16" in script


# --- refittable ONNX: names, padding, refusals ----------------------------------------------------------


def test_padding_to_max_r_is_exact_in_onnx_runtime(refit_plan, models):
    assert refit_plan.parity.max_abs_diff < 1e-4, refit_plan.parity  # rank 8 padded to 16, against torch at rank 8
    again = check_onnx(refit_plan.onnx, models[0].gm, models[0].signature, sizes=[{"batch": 2, "seq": 200}])
    assert again.max_abs_diff < 1e-4


def test_every_pack_tensor_is_a_named_refittable_weight_at_max_r(refit_plan, models):
    model = onnx.load(str(refit_plan.onnx))
    names = weight_names(model)  # what TensorRT's parser will call the weights
    pack = pack_from_model(models[1].gm.state_dict(), models[1].manifest)  # rank 4
    meta = {p.key: p.value for p in model.metadata_props}
    assert SwappableMeta.from_metadata(meta, "refit").max_rank == 16 and meta == refit_plan.meta
    weights = refit_weights(meta, pack)
    assert set(weights) == set(pack.tensors) == set(names) and len(names) == 48
    for name, array in weights.items():
        assert tuple(array.shape) == names[name], name
    down = weights["adapters.encoder.layer.3.output.dense.down_w"]
    assert down.shape == (384, 16) and not down[:, 4:].any()
    assert np.array_equal(down[:, :4], pack.tensors["adapters.encoder.layer.3.output.dense.down_w"].numpy())


def test_a_smaller_pack_padded_into_the_fixed_rank_graph_matches_its_model(refit_plan, models, tmp_path):
    """Swap by hand what a refit swaps: the r=4 pack, padded to 16, in the r=8 model's graph = the r=4 model."""
    model = onnx.load(str(refit_plan.onnx))
    padded = pad_pack(pack_from_model(models[1].gm.state_dict(), models[1].manifest), 16)
    for init in model.graph.initializer:
        if init.name in padded:
            init.CopyFrom(onnx.numpy_helper.from_array(padded[init.name], init.name))
    onnx.save(model, str(tmp_path / "swapped.onnx"))
    parity = check_onnx(tmp_path / "swapped.onnx", models[1].gm, models[1].signature)
    assert parity.max_abs_diff < 1e-4, parity


def test_refit_refuses_a_rank_above_max_r_and_another_base(refit_plan, models, small_config, tmp_path):
    pack = pack_from_model(models[1].gm.state_dict(), models[1].manifest)
    big = dataclasses.replace(pack, tensors={n: torch.from_numpy(a) for n, a in pad_pack(pack, 32).items()})
    with pytest.raises(SurgeryError, match="rank 32, above this engine's maximum 16"):
        refit_weights(refit_plan.meta, big)
    gpt2 = make_adapted(open_model(str(small_config("gpt2"))), tmp_path, 4, seed=0)
    gpt2_pack = pack_from_model(gpt2.gm.state_dict(), gpt2.manifest)
    with pytest.raises(SurgeryError, match="made for another model"):
        refit_weights(refit_plan.meta, gpt2_pack)
    with pytest.raises(SurgeryError, match="not refittable"):
        baked = dataclasses.replace(SwappableMeta.from_metadata(refit_plan.meta, "refit"), max_rank=None)
        refit_weights(baked.to_metadata(), gpt2_pack)


def test_max_r_below_the_model_rank_is_refused_before_export(models, tmp_path):
    with pytest.raises(SurgeryError, match="rank 8, above this engine's maximum 4"):
        prepare_trt(models[0], tmp_path / "m.plan", max_r=4)
    assert list(tmp_path.iterdir()) == []


def test_trtexec_command_has_profile_precision_cache_and_refit(refit_plan):
    args = shlex.split(refit_plan.trtexec())
    assert args[0] == "trtexec" and f"--onnx={refit_plan.onnx}" in args and f"--saveEngine={refit_plan.engine}" in args
    assert "--minShapes=input_ids:1x2,attention_mask:1x2" in args
    assert "--optShapes=input_ids:1x128,attention_mask:1x128" in args
    assert "--maxShapes=input_ids:64x512,attention_mask:64x512" in args
    assert "--fp16" in args and "--refit" in args and f"--timingCacheFile={refit_plan.timing_cache}" in args
    script = refit_plan.command_file.read_text()
    assert script.startswith("#!/bin/sh") and shlex.split(script.split("\n", 2)[2].replace("\\\n", " ")) == args


# --- check-trt ------------------------------------------------------------------------------------------


def test_minilm_export_is_clean_for_tensorrt(refit_plan):
    result = check_trt(refit_plan.onnx)  # the baked export is checked clean in tests/cli/test_trt_cli.py
    assert result.clean, [f.to_json() for f in result.errors]
    assert result.operators["MatMul"] == 72 and result.tensorrt == "10.15"


def test_unsupported_operators_types_and_shapes_are_flagged(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    s = helper.make_tensor_value_info("s", TensorProto.STRING, [1])
    big = helper.make_tensor_value_info("big", TensorProto.FLOAT, [1] * 9)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, None)
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="unique"),
        helper.make_node("Relu", ["big"], ["y"], name="relu9d"),
        helper.make_node("FusedGemm", ["x", "x"], ["c"], name="custom", domain="com.microsoft"),
        helper.make_node("BitwiseNot", ["i"], ["j"], name="bitnot"),
    ]
    i = helper.make_tensor_value_info("i", TensorProto.UINT16, [2])
    j = helper.make_tensor_value_info("j", TensorProto.UINT16, [2])
    graph = helper.make_graph(nodes, "g", [x, s, big, i], [u, y, c, j])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(model, str(tmp_path / "bad.onnx"))
    result = check_trt(tmp_path / "bad.onnx")
    found = {(f.kind, f.where) for f in result.errors}
    assert ("operator", "unique") in found and ("operator", "custom") in found and ("operator", "bitnot") in found
    assert ("dtype", "s") in found and ("dtype", "i") in found and ("shape", "big") in found
    assert not result.clean and ("operator", "relu9d") not in found


def test_check_trt_refuses_a_file_that_is_not_onnx(tmp_path):
    (tmp_path / "x.onnx").write_text("not onnx")
    with pytest.raises(SurgeryError, match="not a readable ONNX model"):
        check_trt(tmp_path / "x.onnx")


# --- Triton ---------------------------------------------------------------------------------------------


def parse_pbtxt(text: str) -> dict:
    """Enough of protobuf text format for a Triton config: scalars, and input/output lists of tensors."""
    config = {k: v.strip('"') for k, v in re.findall(r"^(\w+): (.+)$", text, re.M)}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[\n(.*?)\n\]", text, re.M | re.S).group(1)
        config[kind] = [
            {"name": n, "data_type": t, "dims": [int(d) for d in dims.split(",")]}
            for n, t, dims in re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', block)
        ]
    return config


def test_triton_repo_matches_the_onnx_inputs_and_outputs(refit_plan, models, tmp_path):
    repo = write_triton_repo(tmp_path / "repo", refit_plan.onnx, refit_plan.onnx, models[0].signature, "minilm")
    assert repo.model == tmp_path / "repo" / "minilm" / "1" / "model.onnx" and repo.model.is_file()
    config = parse_pbtxt(repo.config.read_text())
    assert config["name"] == "minilm" and config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == "64"
    graph = onnx.load(str(refit_plan.onnx)).graph
    assert [i["name"] for i in config["input"]] == [i.name for i in graph.input]
    assert [o["name"] for o in config["output"]] == [o.name for o in graph.output]
    assert all(i["data_type"] == "TYPE_INT64" and i["dims"] == [-1] for i in config["input"])
    assert config["output"][0] == {"name": "last_hidden_state", "data_type": "TYPE_FP32", "dims": [-1, 384]}
    assert config["output"][1] == {"name": "pooler_output", "data_type": "TYPE_FP32", "dims": [384]}


# --- on a GPU with TensorRT (pytest -m trt) -----------------------------------------------------------------


def trt(test):
    """`-m trt`; skipped, before any fixture runs, where TensorRT or a CUDA GPU is missing."""
    test = pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed")(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")(test)
    return pytest.mark.trt(test)


@trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_runs_and_matches_torch(models, tmp_path, precision):
    from exporters.tensorrt import build_engine, read_sidecar
    from exporters.trt_run import check_engine

    plan = prepare_trt(
        models[0], tmp_path / "m.plan", precision=precision, shapes=parse_shapes("batch=1:4:8,seq=2:128:256")
    )
    sidecar = build_engine(plan)
    assert plan.engine.is_file() and read_sidecar(plan.engine) == sidecar
    assert sidecar["precision"] == precision and sidecar["gpu"] != "unknown" and len(sidecar["source_sha256"]) == 64
    assert sidecar["profiles"][0]["input_ids"] == {"min": [1, 2], "opt": [4, 128], "max": [8, 256]}
    assert plan.timing_cache.is_file()
    parity = check_engine(plan.engine, models[0].gm, models[0].signature, precision)
    assert parity.ok, parity.summary()


@trt
def test_refit_swaps_packs_and_refuses_a_too_large_rank(models, minilm_base, tmp_path):
    from exporters.tensorrt import build_engine, refit_engine
    from exporters.trt_run import check_engine
    from surgery.packs import save_pack

    plan = prepare_trt(models[0], tmp_path / "m.plan", max_r=16, shapes=parse_shapes("batch=1:2:8,seq=2:64:128"))
    build_engine(plan)
    sizes = [{"batch": 3, "seq": 37}]
    assert check_engine(plan.engine, models[0].gm, models[0].signature, "fp32", sizes).ok
    pack = save_pack(pack_from_model(models[1].gm.state_dict(), models[1].manifest), tmp_path / "r4.safetensors")
    sidecar = refit_engine(plan.engine, pack)
    assert sidecar["pack"]["rank"] == 4
    parity = check_engine(plan.engine, models[1].gm, models[1].signature, "fp32", sizes)
    assert parity.ok, parity
    big = make_adapted(minilm_base, tmp_path, 32, seed=3)
    too_big = save_pack(pack_from_model(big.gm.state_dict(), big.manifest), tmp_path / "r32.onnx_adapter")
    before = plan.engine.read_bytes()
    with pytest.raises(SurgeryError, match="above this engine's maximum 16"):
        refit_engine(plan.engine, too_big)
    assert plan.engine.read_bytes() == before


@trt
def test_cache_engine_runs_prefill_and_decode_in_their_profiles(lm_base, tmp_path):
    from exporters.tensorrt import build_engine
    from exporters.trt_run import check_engine

    captured = lm_base("llama")
    plan = prepare_trt(
        captured, tmp_path / "lm.plan", shapes=["batch=1:2:4", "prefill:seq=1:16:64", "decode:past=1:16:64"]
    )
    sidecar = build_engine(plan)
    assert sidecar["profile_names"] == [PREFILL, DECODE] and len(sidecar["profiles"]) == 2
    parity = check_engine(plan.engine, captured.gm, captured.signature, "fp32")  # one shape in each profile
    assert parity.ok and [s["past"] for s in parity.shapes] == [0, 5], parity.summary()
