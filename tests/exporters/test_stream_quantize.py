"""Streamed quantized export (exporters/stream_quant.py): each base weight quantized as it is written, block-wise
parity against torch with the written blocks dequantized, the same blocks as the in-memory quantized export, the
adapters float. Slow tier: each export runs torch.onnx."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters import stream_quant
from exporters.blockwise import verify_blockwise
from exporters.onnx import export_onnx
from exporters.quantize import Quantization, read_record
from exporters.stream import export_streamed
from exporters.verify import ort_session
from surgery.adapters import parse_spec, stand_in_weights
from surgery.meta import capture_meta
from surgery.pipeline import adapt, open_model
from tests.checkpoints import write_checkpoint

pytestmark = pytest.mark.slow
TASK = "feature-extraction"
SPEC = parse_spec("houlsby", "4")
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def adapted(captured):
    adapt(captured, SPEC, seed=0)
    stand_in_weights(captured.gm, seed=3)  # distinct non-zero adapters
    return captured


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(weightless capture, streamed int4 export, in-memory int4 export of the same adapted model)."""
    folder = write_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
    out = tmp_path_factory.mktemp("stream-int4")
    spec = Quantization(bits=4)
    fake = adapted(capture_meta(str(folder), dtype="fp32", task=TASK))
    with pytest.MonkeyPatch.context() as patch:  # each weight quantized in slices of a few output columns
        patch.setattr(stream_quant, "SLICE_BYTES", 1000)
        streamed = export_streamed(fake, out / "s.onnx", tolerance=1e-4, rtol=1e-4, quantize=spec)
    assert streamed.blocks is not None and streamed.blocks.ok, streamed.blocks.summary()
    eager = adapted(open_model(str(folder), dtype="fp32", task=TASK))
    memory = export_onnx(eager.gm, eager.signature, out / "m.onnx", tolerance=1e-4, rtol=1e-4, quantize=spec)
    return fake, eager, streamed, memory


def _blocks(path) -> dict[str, tuple[bytes, ...]]:
    """{MatMulNBits node: the bytes of its packed blocks, scales and zero points}."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in model.graph.initializer}
    return {
        n.name: tuple(tensors[x].tobytes() for x in n.input[1:] if x)
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }


def test_streamed_int4_writes_the_in_memory_int4_blocks_and_runs_to_its_outputs(exports):
    _, eager, streamed, memory = exports
    got, want = _blocks(streamed.path), _blocks(memory.path)
    assert len(got) == len(want) == 14  # q, k, v, o, gate, up, down x 2 layers
    assert sorted(got.values()) == sorted(want.values())  # the same quantizer, the same rounding, block by block
    sig = eager.signature
    feeds = {n: t.numpy() for n, t in zip(sig.names, sig.examples({"batch": 2, "seq": 16}, seed=5))}
    a = ort_session(streamed.path).run(None, feeds)[0]
    b = ort_session(memory.path).run(None, feeds)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), np.abs(a - b).max()


def test_the_adapters_stay_float_and_the_record_names_them(exports):
    fake, _, streamed, _ = exports
    model = onnx.load(str(streamed.path), load_external_data=False)
    adapters = {n for n, _ in fake.gm.named_parameters() if n.startswith("adapters.")}
    inits = {t.name: t for t in model.graph.initializer}
    assert len(adapters) == 16 and adapters <= set(inits)
    assert all(inits[a].data_type in FLOATS for a in adapters)
    quantized = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert not [n.name for n in quantized if adapters & set(n.input)]
    record = read_record(model)
    assert record is not None and set(record["adapter_tensors"]) == adapters
    assert record == {k: streamed.to_json()["quantization"][k] for k in record}
    assert sorted(record["quantized_weights"].values()) == sorted(
        n for n in fake.keys if n.endswith("_proj.weight")
    )  # every base projection, by its checkpoint name
    assert all(f"{w}_Q4" in inits and w not in inits for w in record["quantized_weights"].values())
    data = streamed.data.stat().st_size
    float_bytes = sum(p.numel() * 4 for n, p in fake.gm.named_parameters() if n.endswith("_proj.weight"))
    assert data < float_bytes  # the float weights are not in the data file beside their blocks


def test_the_blockwise_reference_is_the_dequantized_model(exports):
    """Against torch's float weights the same int4 pair fails block by block: the check's reference matters."""
    fake, _, streamed, _ = exports
    report = verify_blockwise(fake, streamed.path, tolerance=1e-4, rtol=1e-4)
    assert report.failing and report.failing[0] == "block 0", report.markdown()


def test_cli_streams_an_int8_base_with_adapters(cli, tmp_path):
    folder = write_checkpoint(tmp_path / "llama", "llama")
    run = cli(
        "export", folder, "--stream", "--task", TASK, "--method", "houlsby", "--r", "4", "--quantize", "int8",
        "--accuracy-level", "4", "-o", "m.onnx", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    data = run.json
    q = data["quantization"]
    assert data["blockwise"]["ok"] and q["bits"] == 8 and q["quantized_matmuls"] == 14
    assert data["from_checkpoint"] == 20  # every checkpoint tensor: 14 projections quantized, 5 norms, the embedding
    assert q["at_fp32"] is not None and q["at_fp32"]["parity_ok"]  # level 4: checked again at fp32 compute
    assert (data["blockwise"]["parts"][0]["tolerance"], data["blockwise"]["parts"][0]["rtol"]) == (1e-2, 1e-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "m.onnx", "m.onnx.data"]
    record = read_record(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))
    assert record["bits"] == 8 and record["accuracy_level"] == 4 and len(record["quantized_weights"]) == 14


def test_cli_streams_a_swappable_int4_base_with_float_slots(cli, tmp_path):
    folder = write_checkpoint(tmp_path / "llama", "llama")
    run = cli(
        "export", folder, "--stream", "--swappable", "--task", TASK, "--method", "houlsby", "--r", "4",
        "--quantize", "int4", "-o", "m.swappable.onnx", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    data = run.json
    assert data["blockwise"]["ok"] and data["blockwise_no_pack"]["ok"]  # own pack, and no pack, both checked
    assert data["quantization"]["quantized_matmuls"] == 14 and data["adapter_tensors"] == 16
    model = onnx.load(str(tmp_path / "m.swappable.onnx"), load_external_data=False)
    slots = {i.name for i in model.graph.input if i.name.startswith("adapters.")}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert len(slots) == 16 and all(inits[s] in FLOATS for s in slots)  # overridable initializers, float
    assert set(read_record(model)["adapter_tensors"]) == slots
    assert not [n.name for n in model.graph.node if n.op_type == "MatMulNBits" and slots & set(n.input)]


def test_cli_refuses_a_bf16_streamed_quantization_in_one_line(cli, tmp_path):
    folder = write_checkpoint(tmp_path / "llama", "llama")
    run = cli("export", folder, "--stream", "--dtype", "bf16", "--quantize", "int4", "-o", "m.onnx", cwd=tmp_path)
    assert run.code == 2 and "Traceback" not in run.stderr and "--dtype fp32" in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]
