"""Streamed swappable export (exporters/stream.py, `swappable=True`): the pair written from a tiny sharded checkpoint
equals the in-memory `export --swappable` of the same adapted model tensor by tensor (slots, defaults, metadata, base
weights), and ONNX Runtime with no pack / with the written own pack matches torch's base / adapted model. Slow tier:
each export runs torch.onnx (about 15-20 s here); the CLI's refusals before any capture are in the default tier."""

from __future__ import annotations

import onnx
import pytest

from exporters.runtime import AdaptedSession
from exporters.stream import export_streamed, pack_beside
from exporters.swappable import _with_adapters, export_swappable
from exporters.verify import check_session
from surgery.adapters import parse_spec, stand_in_weights
from surgery.bundle import adapted_manifest
from surgery.meta import capture_meta
from surgery.parity import tolerances
from surgery.pipeline import adapt, open_model
from tests.checkpoints import write_checkpoint
from tests.exporters.streamed import arrays, assert_in_streamed

TASK = "feature-extraction"
SPEC = parse_spec("houlsby", "4")


def adapted(captured):
    report = adapt(captured, SPEC, seed=0)
    stand_in_weights(captured.gm, seed=3)  # distinct non-zero adapters: a zero up-projection is the base model
    captured.manifest = adapted_manifest(captured, SPEC, report)
    return captured


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def exports(request, folder, tmp_path_factory):
    """(eager adapted capture, streamed export, in-memory swappable export path) of one tiny Llama folder."""
    dtype = request.param
    out = tmp_path_factory.mktemp(f"swappable-{dtype}")
    fake = adapted(capture_meta(str(folder), dtype=dtype, task=TASK))
    atol, rtol = tolerances(fake.dtype)
    pack = pack_beside(out / "s.swappable.onnx", fake.dtype)
    streamed = export_streamed(fake, out / "s.swappable.onnx", swappable=True, pack=pack, tolerance=atol, rtol=rtol)
    eager = adapted(open_model(str(folder), dtype=dtype, task=TASK))
    export_swappable(eager, out / "m.swappable.onnx", tolerance=atol, rtol=rtol)
    return eager, streamed, out / "m.swappable.onnx"


@pytest.mark.slow
def test_streamed_swappable_is_the_in_memory_export_tensor_by_tensor(exports):
    _, streamed, memory = exports
    pack = "s.pack.safetensors" if streamed.path.parent.name.startswith("swappable-bf16") else "s.onnx_adapter"
    assert sorted(p.name for p in streamed.path.parent.iterdir() if p.name.startswith("s.")) == sorted(
        [pack, "s.swappable.onnx", "s.swappable.onnx.data"]
    )
    assert streamed.slots == 16 and streamed.no_pack is not None and streamed.no_pack.ok
    assert streamed.blocks is not None and streamed.blocks.ok
    s_model, s = arrays(streamed.path)
    m_model, m = arrays(memory)
    # the slots: same graph inputs (rank axis included), same rank-0 defaults, same metadata (fingerprint, sites)
    assert [str(i) for i in s_model.graph.input] == [str(i) for i in m_model.graph.input]
    assert {p.key: p.value for p in s_model.metadata_props} == {p.key: p.value for p in m_model.metadata_props}
    slots = [i.name for i in m_model.graph.input if i.name.startswith("adapters.")]
    assert len(slots) == streamed.slots
    for name in slots:
        assert s[name].dtype == m[name].dtype and s[name].shape == m[name].shape
        assert 0 in s[name].shape or not s[name].any(), name  # rank 0, or the zero up_b
        assert s[name].tobytes() == m[name].tobytes(), name
    # every other tensor of the in-memory export is one of the streamed file's (by name, or transposed)
    external = {t.name for t in s_model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert len(external) == streamed.from_checkpoint == 20
    assert_in_streamed(s, m, skip=slots)


@pytest.mark.slow
def test_streamed_swappable_runs_with_no_pack_and_with_its_own_pack(exports):
    eager, streamed, _ = exports
    atol, rtol = tolerances(eager.gm.get_parameter("norm.weight").dtype)
    session = AdaptedSession(streamed.path)
    base = _with_adapters(eager.gm, "base")
    for s in {id(session.session): session.session, id(session.base_session): session.base_session}.values():
        parity = check_session(s, base, eager.signature, atol, rtol=rtol)
        assert parity.ok, parity.summary()
    session.load("own", streamed.pack)
    own = session.run_options("own")
    parity = check_session(session.session, eager.gm, eager.signature, atol, run_options=own, rtol=rtol)
    assert parity.ok, parity.summary()
    against_base = check_session(session.session, base, eager.signature, atol, run_options=own, rtol=rtol)
    assert not against_base.ok  # the pack does change the outputs: the check above can fail


@pytest.mark.slow
def test_cli_streams_a_swappable_export_and_its_pack(cli, folder, tmp_path):
    args = ["--stream", "--swappable", "--task", TASK, "--method", "houlsby", "--r", "4", "--json"]
    run = cli("export", folder, *args, "-o", "m.swappable.onnx", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["swappable"] and run.json["adapter_tensors"] == 16
    assert run.json["blockwise"]["ok"] and run.json["blockwise_no_pack"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "m.onnx_adapter",
        "m.swappable.onnx",
        "m.swappable.onnx.data",
    ]
    lora = cli(
        "export", folder, "--stream", "--swappable", "--task", TASK, "--method", "lora", "-o", "l.onnx", cwd=tmp_path
    )
    assert lora.code == 2 and "Traceback" not in lora.stderr and "bottleneck adapters" in lora.stderr
    assert not (tmp_path / "l.onnx").exists() and not (tmp_path / "l.onnx_adapter").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--stream", "--route"], "cannot open", marks=pytest.mark.slow),
        pytest.param(["--stream", "--swappable"], "--method houlsby", marks=pytest.mark.slow),
    ],
    ids=["--route", "--swappable without --method"],
)  # slow tier (the CLI error paths): each is a CLI process, about 4-6 s of imports here
def test_cli_refuses_before_any_capture(cli, tmp_path, args, message):
    refused = cli("export", tmp_path, *args, cwd=tmp_path)
    assert refused.code == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert list(tmp_path.iterdir()) == []
