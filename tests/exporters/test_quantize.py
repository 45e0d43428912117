"""Quantized bases (exporters/quantize.py): int4 and int8 MatMulNBits weights, adapters float, every export kind
checked against torch with the same quantized weights. Small random-weight models in the fast tier; the real
MiniLM in the slow tier."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch.utils import _pytree as pytree

from exporters.onnx import export_onnx
from exporters.quantize import (
    LEVEL4_TOLERANCES,
    META,
    Quantization,
    dequantize_node,
    float_adapters,
    quantize_model,
    read_record,
)
from exporters.runtime import AdaptedSession
from exporters.swappable import export_routed, export_swappable
from exporters.verify import ort_session
from surgery.adapters import AdapterSpec
from surgery.errors import SurgeryError
from surgery.packs import pack_from_model
from surgery.pipeline import open_model, stand_in_adapted

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    """y = x @ w, w (K, N) an initializer."""
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize(
    "bits, symmetric, algorithm",
    [
        (4, True, "default"),
        (4, False, "default"),
        (8, True, "default"),
        (8, False, "default"),
        (4, True, "hqq"),
        (4, False, "rtn"),
        (4, True, "k_quant"),
    ],
)
def test_dequantized_weights_are_what_onnx_runtime_multiplies_by(bits, symmetric, algorithm):
    # K not a multiple of the block (the last block padded); rtn and k_quant (Intel Neural Compressor's code inside
    # ONNX Runtime) fail to pack the zero points of an odd number of blocks, so they get whole blocks
    k, n = (80 if algorithm in ("default", "hqq") else 128), 24
    w = np.random.default_rng(bits).standard_normal((k, n)).astype(np.float32)
    spec = Quantization(bits=bits, block_size=32, symmetric=symmetric, algorithm=algorithm, accuracy_level=1)
    model, report = quantize_model(_matmul_model(w), spec, "test")
    assert report.quantized == 1 and [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    session = ort_session(model.SerializeToString())
    ort_w = session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]  # rows of the identity pick out the weight
    tensors = {t.name: t for t in model.graph.initializer}
    ours = dequantize_node(model.graph.node[0], tensors)
    np.testing.assert_allclose(ours, ort_w, rtol=0, atol=1e-5)
    step = np.abs(w).max() / (2 ** (bits - 1) - 1)
    assert 0 < np.abs(ours - w).max() <= step  # quantized, and within one step of the float weight


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, small_config):
    folder = tmp_path_factory.mktemp("quant")
    base = open_model(str(small_config("bert")))
    return [
        stand_in_adapted(base, AdapterSpec("houlsby", r=r), folder / f"m{r}.adapted.pt2", i, 100 + i)
        for i, r in enumerate((4, 8))
    ]


def _export(kind, models, path, spec):
    atol, rtol = spec.tolerances(None, None, (1e-4, 1e-4))
    if kind == "baked":
        m = models[0]
        return export_onnx(m.gm, m.signature, path, tolerance=atol, rtol=rtol, manifest=m.manifest, quantize=spec)
    if kind == "swappable":
        return export_swappable(models[1], path, tolerance=atol, rtol=rtol, quantize=spec)
    return export_routed(models, path, tolerance=atol, rtol=rtol, quantize=spec)


def _adapters_float(model: onnx.ModelProto, routed: bool = False) -> int:
    """Every adapter tensor a float initializer, read by no MatMulNBits; the number of them. A routed export's
    stacks are anonymous: its 3-D initializers (adapters x rows x columns) and the adapter_id-gathered ones."""
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"} if routed else set()
    adapters = {
        t.name: t.data_type
        for t in model.graph.initializer
        if t.name.startswith("adapters.") or (routed and (len(t.dims) == 3 or t.name in gathered) and t.dims[0] == 2)
    }
    assert adapters and all(dtype in FLOATS for dtype in adapters.values())
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            assert not any(x in adapters for x in node.input), node.name
    return len(adapters)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, adapted):
    folder = tmp_path_factory.mktemp("quant-exports")
    cases = {("baked", "int8"), ("swappable", "int4"), ("routed", "int4")}
    return {
        (kind, name): _export(kind, adapted, folder / f"{kind}.{name}.onnx", Quantization.named(name))
        for kind, name in sorted(cases)
    }


@pytest.mark.parametrize("kind, name", [("baked", "int8"), ("swappable", "int4"), ("routed", "int4")])
def test_every_kind_quantizes_the_base_and_keeps_the_adapters_float(exports, kind, name):
    result = exports[kind, name]
    data = result.to_json()
    assert data["max_rel_diff"] < 1e-4  # against torch with the dequantized weights
    model = onnx.load(str(result.path))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert len(nbits) == 12 and {a["bits"] for a in attrs} == {int(name[3:])}  # q, k, v, o, ffn in, out x 2 layers
    assert data["quantization"]["adapter_tensors_float"] == 16  # 4 per bottleneck, 2 per layer, 2 layers
    assert _adapters_float(model, routed=kind == "routed") >= (8 if kind == "routed" else 16)
    meta = json.loads({p.key: p.value for p in model.metadata_props}[META])
    assert meta["bits"] == int(name[3:]) and meta["quantized_matmuls"] == 12 and meta["block_size"] == 32
    assert data["quantization"]["from_float"]["max_abs_diff"] > 1e-4  # the base is quantized, and that is reported


@pytest.mark.parametrize("kind, name", [("baked", "int8"), ("swappable", "int4"), ("routed", "int4")])
def test_the_metadata_and_the_json_record_which_weights_were_quantized_and_which_kept_float(exports, kind, name):
    result = exports[kind, name]
    data = result.to_json()["quantization"]
    model = onnx.load(str(result.path))
    meta = read_record(model)
    assert meta is not None and {k: data[k] for k in meta} == meta  # the JSON is the metadata and more
    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert sorted(meta["quantized_weights"]) == sorted(nbits)  # every quantized node, by name
    inits = {t.name: t for t in model.graph.initializer}
    for node, weight in meta["quantized_weights"].items():
        assert weight not in inits and nbits[node].input[1] == f"{weight}_Q{int(name[3:])}"  # replaced
    adapters = set(meta["adapter_tensors"])
    assert len(adapters) == data["adapter_tensors_float"] == 16 and adapters <= set(inits)  # every slot, float
    assert all(inits[a].data_type in FLOATS for a in adapters)
    assert not adapters & set(meta["quantized_weights"].values())
    matmuls = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
    floats = meta["float_nodes"]
    assert set(floats["adapter"]) <= matmuls and not floats["head"]
    # attention's two MatMuls of activations per layer; a routed export's adapters multiply by the rows its
    # adapter_id gathers from the stacks, not by a constant: those are among the others too
    assert len(floats["adapter"]) == (0 if kind == "routed" else 8)
    assert len(floats["other"]) == 4 + (8 if kind == "routed" else 0), floats["other"]
    readers = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and adapters & set(n.input)}
    assert readers <= set(floats["adapter"]), readers - set(floats["adapter"])
    settings = (meta["bits"], meta["block_size"], meta["symmetric"], meta["algorithm"])
    assert settings == (int(name[3:]), 32, True, "default")


def test_a_pack_switch_on_the_int4_base_moves_the_output_as_in_fp32(exports, adapted):
    result = exports["swappable", "int4"]
    session = AdaptedSession(result.path)
    for m in adapted:
        session.load(f"r{m.manifest.adapter.r}", pack_from_model(m.gm.state_dict(), m.manifest))
    sig = adapted[0].signature
    tensors = sig.examples({"batch": 2, "seq": 20}, seed=3)
    feeds = {n: t.numpy() for n, t in zip(sig.names, tensors)}
    ort = {r: session.run(feeds, adapter=f"r{r}")[0] for r in (4, 8)}
    with torch.no_grad():
        fp32 = {m.manifest.adapter.r: pytree.tree_leaves(sig.call(m.gm, tensors))[0].numpy() for m in adapted}
    moved, expected = (ort[8] - ort[4]).ravel(), (fp32[8] - fp32[4]).ravel()
    cosine = moved @ expected / np.linalg.norm(moved) / np.linalg.norm(expected)
    assert np.abs(expected).max() > 0.1 and cosine > 0.99, cosine


def test_accuracy_level_4_is_checked_loosely_and_its_weights_again_at_fp32(tmp_path, adapted):
    spec = Quantization(bits=4, accuracy_level=4)
    result = _export("baked", adapted, tmp_path / "l4.onnx", spec)
    assert (result.parity.atol, result.parity.rtol) == LEVEL4_TOLERANCES
    exact = result.quantization.reference
    assert exact is not None and exact.ok and (exact.atol, exact.rtol) == (1e-4, 1e-4)
    levels = {
        helper.get_attribute_value(a)
        for n in onnx.load(str(result.path)).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}


def test_quantizing_without_the_exclusions_is_caught():
    """What ONNX Runtime's quantizer does when it is not told: the adapter's MatMul quantized too. The guard refuses
    that; `quantize_model` leaves it float."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    base, down = (rng.standard_normal(shape).astype(np.float32) for shape in ((64, 64), (64, 32)))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "base.w"], ["h"], name="base"),
            helper.make_node("MatMul", ["h", "adapters.site.down_w"], ["y"], name="down"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 32])],
        [numpy_helper.from_array(base, "base.w"), numpy_helper.from_array(down, "adapters.site.down_w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), bits=4, block_size=32)
    quantizer.process()
    assert [n.op_type for n in quantizer.model.model.graph.node] == ["MatMulNBits", "MatMulNBits"]
    with pytest.raises(AssertionError, match="adapter tensors were quantized"):
        float_adapters(quantizer.model.model, "test")
    ours, report = quantize_model(model, Quantization(bits=4), "test")
    assert [n.op_type for n in ours.graph.node] == ["MatMulNBits", "MatMul"] and report.adapter_tensors == 1


@pytest.mark.slow
def test_the_cache_graph_of_a_causal_lm_quantizes_with_a_float_head(tmp_path, lm_base):
    base = lm_base("llama")
    m = stand_in_adapted(base, AdapterSpec("houlsby", r=8), tmp_path / "lm.adapted.pt2", 0, 5)
    spec = Quantization(bits=4, head=False)
    result = export_onnx(m.gm, m.signature, tmp_path / "lm.onnx", manifest=m.manifest, quantize=spec)
    assert result.parity.ok and result.quantization.quantized == 14  # q, k, v, o, gate, up, down x 2 layers
    model = onnx.load(str(result.path))
    made = {o: n for n in model.graph.node for o in n.output}
    assert made["logits"].op_type == "MatMul"  # the head stays float
    assert any(o.name.startswith("present.") for o in model.graph.output)
    _adapters_float(model)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(name="int3"), "choose int4 or int8"),
        (dict(name="int4", block_size=24), "power of two"),
        (dict(name="int8", algorithm="rtn"), "int4 only"),
        (dict(name="int4", accuracy_level=5), "--accuracy-level 5"),
        (dict(name="int4", algorithm="gptq"), "choose one of"),
    ],
)
def test_bad_settings_are_refused(options, message):
    options = dict(options)
    with pytest.raises(SurgeryError, match=message):
        Quantization.named(options.pop("name"), **options)


def test_cli_exports_an_int4_model(tmp_path, adapted, cli):
    source = adapted[0].source.path
    out = tmp_path / "m.int4.onnx"
    run = cli("export", source, "--quantize", "int4", "--asymmetric", "-o", out, "--json")
    assert run.code == 0, run.stderr
    data = run.json
    assert data["quantization"]["bits"] == 4 and data["quantization"]["quantized_matmuls"] == 12
    assert data["quantization"]["symmetric"] is False and data["parity_ok"] and out.is_file()
    assert read_record(onnx.load(str(out)))["quantized_weights"] == data["quantization"]["quantized_weights"]
    assert len(data["quantization"]["quantized_weights"]) == 12 and len(data["quantization"]["adapter_tensors"]) == 16
    zero_points = [t for t in onnx.load(str(out)).graph.initializer if t.name.endswith("_zero_points")]
    assert len(zero_points) == 12
    refused = cli("export", source, "--quantize", "int4", "--fused-pt2", "-o", tmp_path / "s.onnx")
    assert refused.code == 2 and "--quantize writes a baked" in refused.stderr
    assert not (tmp_path / "s.onnx").exists()


# The real MiniLM: sizes and distances, int4 and int8, baked and swappable.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["int4", "int8"])
def test_real_minilm_quantized(tmp_path, minilm_base, name):
    m = stand_in_adapted(minilm_base, AdapterSpec("houlsby", r=8), tmp_path / "m.adapted.pt2", 0, 7)
    spec = Quantization.named(name)
    float_size = export_onnx(m.gm, m.signature, tmp_path / "f.onnx", manifest=m.manifest).path.stat().st_size
    baked = _export("baked", [m], tmp_path / "b.onnx", spec)
    swappable = _export("swappable", [m, m], tmp_path / "s.onnx", spec)
    size = baked.path.stat().st_size
    print(f"\nMiniLM {name}: {size / 1e6:.1f} MB (fp32 {float_size / 1e6:.1f} MB); {baked.to_json()['quantization']}")
    assert baked.parity.ok and swappable.base_parity.ok and swappable.pack_parity.ok
    assert baked.quantization.quantized == 36 and swappable.quantization.quantized == 36
    # the embedding tables and the pooler (a Gemm) stay float: only the layers' MatMul weights shrink, to their bits
    # plus one fp32 scale per block of 32
    weights = sum(p.numel() for n, p in m.gm.named_parameters() if p.dim() == 2 and n.startswith("encoder.layer"))
    saved = weights * 4 * (1 - (0.5 if name == "int4" else 1) / 4 - 1 / 32)
    assert abs((float_size - size) - saved) < 0.02 * saved, (float_size, size, saved)
