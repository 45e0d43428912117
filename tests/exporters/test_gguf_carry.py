"""GGUF Q4_0 and Q8_0 blocks carried into MatMulNBits without a second rounding (exporters/gguf_carry.py): on a small
Llama GGUF holding Q8_0, Q4_0 and F16 matrices, `--quantize int4` carries the Q4_0 weights and `int8` the Q8_0 ones,
equal to transformers' dequantization of the same file; the other matrices are requantized and the record says so.
Slow tier: each export runs torch.onnx."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.gguf_carry import _blocks
from exporters.onnx import export_onnx
from exporters.quantize import Quantization, dequantize_node, read_record
from surgery.pipeline import open_model
from tests.checkpoints import write_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, vocab=300, layers=2, quantized=True)  # matrices Q8_0, Q4_0, F16 in turn
    return path, open_model(str(path))


@pytest.mark.parametrize("bits, kind", [(4, "Q4_0"), (8, "Q8_0")])
def test_the_gguf_blocks_are_carried_unrounded(gguf_model, tmp_path, bits, kind):
    import gguf

    path, m = gguf_model
    spec = Quantization(bits=bits, gguf=str(path))
    result = export_onnx(m.gm, m.signature, tmp_path / "m.onnx", tolerance=1e-4, rtol=1e-4, quantize=spec)
    assert result.parity.ok
    model = onnx.load(str(result.path))
    record = read_record(model)
    carried = record["gguf"]["carried"]
    reader = gguf.GGUFReader(str(path))
    of_kind = {t.name: t for t in reader.tensors if t.tensor_type.name == kind and t.name.startswith("blk.")}
    assert sorted(carried.values()) == sorted(of_kind)  # every base matrix of that block type, and no other
    assert record["gguf"]["requantized"] == record["quantized_matmuls"] - len(carried) == 14 - len(carried)
    assert f"{len(carried)} weights carried from the GGUF's {kind} blocks unrounded" in record["gguf"]["summary"]
    assert "requantized from their dequantized values" in record["gguf"]["summary"]
    tensors = {t.name: t for t in model.graph.initializer}
    params = {n: p.detach().numpy() for n, p in m.gm.named_parameters() if p.dim() == 2}
    nodes = {n.name: n for n in model.graph.node}
    for node_name, tensor in carried.items():
        node = nodes[node_name]
        w = dequantize_node(node, tensors).T  # (N, K): the GGUF's rows, as MatMulNBits computes them
        # transformers' dequantization of the same file, as the model holds it: equal, not within a tolerance
        assert any(p.shape == w.shape and np.array_equal(p, w) for p in params.values()), node_name
        assert len(node.input) == 3  # no zero points: 8 (int4) and 128 (int8), MatMulNBits' defaults
        # the packed bytes are the file's blocks re-packed (the rows in the order transformers puts them)
        raw = np.asarray(of_kind[tensor].data)
        packed = numpy_helper.to_array(tensors[node.input[1]])
        q, d = _blocks(raw, bits, w.shape[1], np.dtype(np.float32))
        assert sorted(map(bytes, packed.reshape(packed.shape[0], -1))) == sorted(map(bytes, q.reshape(q.shape[0], -1)))
    # the carried weights are the float model's own: only the requantized ones move the output away from it
    assert result.quantization.from_float["max_abs_diff"] > 0


def test_no_carry_without_a_gguf_or_at_another_block_size(gguf_model, tmp_path):
    path, m = gguf_model
    spec = Quantization(bits=4, block_size=64, gguf=str(path))
    result = export_onnx(m.gm, m.signature, tmp_path / "m.onnx", tolerance=1e-4, rtol=1e-4, quantize=spec)
    record = read_record(onnx.load(str(result.path)))
    assert "gguf" not in record and record["block_size"] == 64 and record["quantized_matmuls"] == 14


def test_cli_carries_a_gguf_sources_blocks_and_says_so(gguf_model, cli, tmp_path):
    path, _ = gguf_model
    run = cli("export", path, "--quantize", "int8", "-o", tmp_path / "m.int8.onnx")
    assert run.code == 0, run.stderr
    assert "4 weights carried from the GGUF's Q8_0 blocks unrounded; 10 requantized" in run.stdout, run.stdout
    record = read_record(onnx.load(str(tmp_path / "m.int8.onnx")))
    assert record["gguf"]["file"] == "tiny.gguf" and len(record["gguf"]["carried"]) == 4
