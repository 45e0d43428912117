"""Streamed export (exporters/stream.py) and block-wise verification (exporters/blockwise.py) on a tiny sharded
checkpoint: the pair is the in-memory export tensor by tensor, runs in ONNX Runtime to torch's outputs, and a
corrupted block in its data file is found and named. Slow tier: each export runs torch.onnx (about 20 s here)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.blockwise import verify_blockwise
from exporters.onnx import onnx_program
from exporters.stream import export_streamed
from exporters.verify import check_onnx
from surgery.adapters import parse_spec, stand_in_weights
from surgery.meta import capture_meta
from surgery.parity import tolerances
from surgery.pipeline import adapt, open_model
from tests.checkpoints import write_checkpoint
from tests.conftest import fused_adapter_ops

pytestmark = pytest.mark.slow
TASK = "feature-extraction"
SPEC = parse_spec("lora", "4", targets="q,v,ffn_out")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def adapted(captured):
    adapt(captured, SPEC, seed=0)
    stand_in_weights(captured.gm, seed=3)  # distinct non-zero adapters: a zero LoRA is the base model
    return captured


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def streamed(request, folder, tmp_path_factory):
    """(weightless capture, eager capture, path of the streamed pair) in one dtype; the pair verified per block."""
    dtype = request.param
    fake = adapted(capture_meta(str(folder), dtype=dtype, task=TASK))
    path = tmp_path_factory.mktemp(f"stream-{dtype}") / "tiny.onnx"
    atol, rtol = tolerances(fake.dtype)
    result = export_streamed(fake, path, tolerance=atol, rtol=rtol)
    assert result.blocks is not None and result.blocks.ok, result.blocks.summary()
    assert [p.name for p in result.blocks.parts] == ["block 0", "block 1", "output"]
    eager = adapted(open_model(str(folder), dtype=dtype, task=TASK))
    return fake, eager, result


def test_streamed_export_is_the_in_memory_export_tensor_by_tensor(streamed):
    fake, eager, result = streamed
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]
    reference = {
        t.name: t
        for t in onnx_program(eager.gm, eager.signature, "in memory", optimize=False).model_proto.graph.initializer
    }
    got = {t.name: t for t in onnx.load(str(result.path), load_external_data=False).graph.initializer}
    params = [n for n, _ in eager.gm.named_parameters()]
    assert result.from_checkpoint == len(fake.keys) == len([n for n in params if not n.startswith("adapters.")])
    for name in params:  # base weights from the shards, adapters from memory: same names, same bytes
        if name in fake.keys:  # base weights are all in the data file (adapters under 1 KB stay in the graph)
            assert got[name].data_location == onnx.TensorProto.EXTERNAL
        want = numpy_helper.to_array(reference[name])
        have = numpy_helper.to_array(got[name], base_dir=str(result.path.parent))
        assert want.dtype == have.dtype and want.shape == have.shape
        assert want.tobytes() == have.tobytes(), name


def test_streamed_export_runs_in_ort_to_torchs_outputs(streamed):
    _, eager, result = streamed
    atol, rtol = tolerances(eager.gm.get_parameter("norm.weight").dtype)
    parity = check_onnx(result.path, eager.gm, eager.signature, tolerance=atol, rtol=rtol)
    assert parity.ok, parity.summary()


def test_blockwise_verification_names_a_corrupted_block(streamed, tmp_path):
    fake, _, result = streamed
    path = tmp_path / result.path.name
    for src in (result.path, result.data):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    tensor = next(
        t
        for t in onnx.load(str(path), load_external_data=False).graph.initializer
        if t.name == "layers.1.mlp.down_proj.weight"
    )
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    raw = bytearray(path.with_name(path.name + ".data").read_bytes())
    block = np.frombuffer(raw, dtype=np.uint8, count=length, offset=offset).copy()
    raw[offset : offset + length] = block[::-1].tobytes()  # the weight's bytes reversed: a damaged copy
    path.with_name(path.name + ".data").write_bytes(bytes(raw))
    atol, rtol = tolerances(fake.dtype)
    report = verify_blockwise(fake, path, tolerance=atol, rtol=rtol)
    assert report.failing == ["block 1"], report.markdown()


def test_blockwise_verification_with_no_fixed_allowance_passes_within_torch_noise(streamed):
    """atol = rtol = 0: every block that differs at all is measured against its own torch noise (float64), and a
    correct export stays within NOISE_K of it; the corrupted block above is refused by the same rule."""
    fake, _, result = streamed
    report = verify_blockwise(fake, result.path, tolerance=0.0, rtol=0.0)
    assert report.ok, report.markdown()
    assert any(p.parity.noise == "torch fp32 against float64" for p in report.parts), report.markdown()


def test_cli_streams_a_folder_with_adapters(cli, folder, tmp_path):
    run = cli(
        "export",
        folder,
        "--stream",
        "--task",
        TASK,
        "--method",
        "lora",
        "--r",
        "4",
        "-o",
        "m.onnx",
        "--json",
        cwd=tmp_path,
    )
    assert run.code == 0, run.stderr
    data = run.json
    assert data["blockwise"]["ok"] and data["from_checkpoint"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    refused = cli("export", folder, "--method", "lora", cwd=tmp_path)
    assert refused.code == 2 and "Traceback" not in refused.stderr
    assert "--stream" in refused.stderr


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # o_proj without a bias; GPT-2's Conv1D with one
def test_streamed_houlsby_exports_the_fused_form_and_leaves_base_weights_as_stored(family, tmp_path):
    """Baked bottlenecks stream in surgery/fuse.py's fused form with the up-bias as a unit rank (never folded
    into a projection's bias: base weights are the checkpoint's bytes), and verify block by block against the
    unfused model in torch."""
    from surgery.adapters import AdapterSpec

    folder = write_checkpoint(tmp_path / family, family)
    fake = capture_meta(str(folder), task=TASK)
    adapt(fake, AdapterSpec("houlsby", r=4), seed=0)
    stand_in_weights(fake.gm, seed=3)
    result = export_streamed(fake, tmp_path / "h.onnx")
    assert result.blocks is not None and result.blocks.ok, result.blocks.summary()
    graph = onnx.load(str(result.path), load_external_data=False).graph
    ops = fused_adapter_ops(graph)
    assert ops == {"Gemm": 4, "MatMul": 4}, ops  # 2 layers x 2 sites x (down, up): nothing else reads an adapter
    stored = {t.name: t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert result.from_checkpoint == len(fake.keys) and len(stored) >= result.from_checkpoint
