"""Swappable ONNX, adapter packs and routing on the real pretrained MiniLM: every pack checked against torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from exporters.runtime import AdaptedSession
from exporters.slots import base_only
from exporters.swappable import RANK, check_rows, export_routed, export_swappable
from exporters.verify import check_session, ort_session
from surgery.adapters import AdapterSpec
from surgery.errors import SurgeryError
from surgery.packs import check_pack, load_pack, pack_from_model, save_pack
from surgery.pipeline import open_model
from surgery.route import route
from tests.conftest import make_adapted

RANKS = (4, 8, 32)


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_base):
    folder = tmp_path_factory.mktemp("swap")
    return [make_adapted(minilm_base, folder, r, seed=i) for i, r in enumerate(RANKS)]


@pytest.fixture(scope="module")
def swappable(tmp_path_factory, models):
    folder = tmp_path_factory.mktemp("swappable")
    result = export_swappable(models[1], folder / "minilm.swappable.onnx")
    packs = {}
    for m, suffix in zip(models, (".onnx_adapter", ".safetensors", ".onnx_adapter")):
        r = m.manifest.adapter.r
        packs[r] = save_pack(pack_from_model(m.gm.state_dict(), m.manifest), folder / f"r{r}{suffix}")
    return result, packs


def test_swappable_graph_has_rank0_overridable_slots(swappable):
    result, _ = swappable
    assert result.slots == 48 and result.base_parity.ok and result.pack_parity.ok
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    inputs = {i.name: i for i in model.graph.input}
    inits = {i.name: i for i in model.graph.initializer}
    name = "adapters.encoder.layer.0.attention.output.dense.down_w"
    assert name in inputs and name in inits
    assert [d.dim_value or d.dim_param for d in inputs[name].type.tensor_type.shape.dim] == [384, RANK]
    assert list(inits[name].dims) == [384, 0]


def test_each_pack_matches_torch_and_no_pack_is_the_base(swappable, models, minilm_base):
    result, packs = swappable
    session = AdaptedSession(result.path)
    for m in models:
        r = m.manifest.adapter.r
        session.load(f"r{r}", packs[r])
        parity = check_session(session.session, m.gm, m.signature, 1e-4, run_options=session.run_options(f"r{r}"))
        assert parity.max_abs_diff < 1e-4, (r, parity)
    base = check_session(session.session, minilm_base.gm, minilm_base.signature, 1e-4)
    assert base.max_abs_diff < 1e-4, base


def test_no_pack_runs_the_base_graph_cut_out_of_the_export(swappable, models, minilm_base):
    result, packs = swappable
    session = AdaptedSession(result.path)
    assert session.base_session is not session.session
    model = onnx.load(str(result.path))
    base = base_only(model, session.widths)
    assert not [i for i in base.graph.input if i.name.startswith("adapters.")]
    assert not [t for t in base.graph.initializer if t.name.startswith("adapters.")]
    assert len(base.graph.node) == len(model.graph.node) - 12 * 6  # MatMul, Add, Relu, MatMul, Add, Add per slot
    parity = check_session(session.base_session, minilm_base.gm, minilm_base.signature, 1e-4)
    assert parity.max_abs_diff < 1e-4, parity
    x = dict(
        zip(minilm_base.signature.names, (t.numpy() for t in minilm_base.signature.examples({"batch": 2, "seq": 9})))
    )
    session.load("r8", packs[8])
    no_pack, with_pack = session.run(x)[0], session.run(x, adapter="r8")[0]
    assert np.abs(no_pack - session.session.run(None, x)[0]).max() < 1e-4  # the slot path with no pack agrees
    assert np.abs(no_pack - with_pack).max() > 0.01  # and the pack still changes the run
    assert AdaptedSession(result.path, base_path=False).base_session is not None


def test_switching_back_and_forth_repeats_the_same_numbers(swappable, models):
    result, packs = swappable
    session = AdaptedSession(result.path)
    for r, path in packs.items():
        session.load(f"r{r}", path)
    sig = models[0].signature
    feeds = {n: t.numpy() for n, t in zip(sig.names, sig.examples({"batch": 2, "seq": 20}, seed=9, pad=True))}
    order = ["r4", "r32", None, "r8", "r4", None, "r32", "r8"]
    seen = {}
    for name in order:
        out = session.run(feeds, adapter=name)[0]
        if name in seen:
            assert np.array_equal(seen[name], out), name
        seen[name] = out
    assert not np.allclose(seen["r4"], seen["r32"])
    assert not np.allclose(seen["r4"], seen[None])


def test_packs_round_trip_between_formats(tmp_path, swappable):
    _, packs = swappable
    original = load_pack(packs[8])  # .safetensors
    there = load_pack(save_pack(original, tmp_path / "p.onnx_adapter"))
    back = load_pack(save_pack(there, tmp_path / "p.safetensors"))
    for pack in (there, back):
        assert pack.fingerprint == original.fingerprint and pack.tensors.keys() == original.tensors.keys()
        for name, t in original.tensors.items():
            assert torch.equal(pack.tensors[name], t), name


def _mutate(pack, how):
    tensors = dict(pack.tensors)
    if how == "drop":
        del tensors["adapters.encoder.layer.2.output.dense.up_b"]
    elif how == "rank":
        name = "adapters.encoder.layer.1.output.dense.up_w"
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    return dataclasses.replace(pack, tensors=tensors)


@pytest.mark.parametrize(
    "how, message",
    [
        ("drop", "lacks tensor adapters.encoder.layer.2.output.dense.up_b"),
        ("rank", "adapters.encoder.layer.1.output.dense.up_w has shape"),
    ],
)
def test_damaged_packs_are_refused_by_name(swappable, how, message):
    result, packs = swappable
    session = AdaptedSession(result.path)
    with pytest.raises(SurgeryError, match=message):
        session.load("bad", _mutate(load_pack(packs[8]), how))
    assert session.adapters == []


def test_corrupt_pack_file_is_refused(tmp_path, swappable):
    _, packs = swappable
    for path in packs.values():
        data = path.read_bytes()
        bad = tmp_path / f"bad{path.suffix}"
        bad.write_bytes(data[: len(data) // 3])
        with pytest.raises(SurgeryError, match="not a readable|damaged or forged"):
            load_pack(bad)


def test_pack_of_another_base_is_refused(tmp_path, small_config, swappable):
    gpt2 = open_model(str(small_config("gpt2")))
    other = make_adapted(gpt2, tmp_path, 4, seed=0)
    pack = pack_from_model(other.gm.state_dict(), other.manifest)
    session = AdaptedSession(swappable[0].path)
    with pytest.raises(SurgeryError, match="made for another model"):
        session.load("gpt2", pack)
    with pytest.raises(SurgeryError, match="made for another model"):
        check_pack(load_pack(save_pack(pack, tmp_path / "g.onnx_adapter")), session.fingerprint, session.widths)


@pytest.mark.slow  # make test stays under 6 minutes; CI runs it in make test-slow
def test_routing_matches_each_model_row_by_row(tmp_path, models, minilm_base):
    result = export_routed(models, tmp_path / "routed.onnx")
    assert result.ids == [0, 2, -1, 1, 3] and result.rank == 32  # 3: out of range, the base model
    assert result.rows.max_abs_diff < 1e-4 and result.parity.max_abs_diff < 1e-4
    # every row with an id out of range (-1, by convention) is the base model
    from exporters.verify import ort_session

    session = ort_session(result.path)
    sig = minilm_base.signature
    tensors = sig.examples({"batch": 3, "seq": 16}, seed=2)
    ids = np.array([-1, 3, np.iinfo(np.int64).min], dtype=np.int64)
    feeds = {n: t.numpy() for n, t in zip(sig.names, tensors)} | {"adapter_id": ids}
    with torch.no_grad():
        want = sig.call(minilm_base.gm, tensors)[0].numpy()
    assert np.abs(session.run(None, feeds)[0] - want).max() < 1e-4


def test_routing_refuses_models_with_different_sites(tmp_path, models, minilm_base):
    attn_only = make_adapted(
        minilm_base, tmp_path, 8, seed=5, spec=AdapterSpec("houlsby", r=8, targets=r"attention\.output\.dense$")
    )
    with pytest.raises(SurgeryError, match="sites"):
        export_routed([models[0], attn_only], tmp_path / "r.onnx")
    assert not (tmp_path / "r.onnx").exists()


@pytest.mark.slow  # every family also in each make test-matrix run
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5"])
def test_swappable_and_routed_on_small_architectures(tmp_path, small_config, model_type):
    base = open_model(str(small_config(model_type)))
    a, b = make_adapted(base, tmp_path, 4, seed=0), make_adapted(base, tmp_path, 8, seed=1)
    swappable = export_swappable(a, tmp_path / "s.onnx")
    assert swappable.base_parity.max_abs_diff < 1e-4 and swappable.pack_parity.max_abs_diff < 1e-4
    session = AdaptedSession(swappable.path)
    session.load("b", pack_from_model(b.gm.state_dict(), b.manifest))  # rank 8 into a slot exported from rank 4
    parity = check_session(session.session, b.gm, b.signature, 1e-4, run_options=session.run_options("b"))
    assert parity.max_abs_diff < 1e-4, parity
    routed = export_routed([a, b], tmp_path / "r.onnx")
    assert routed.rows.max_abs_diff < 1e-4 and routed.rank == 8
    # no fixed allowance: each row against its own model's torch noise (float64)
    rows = check_rows(ort_session(routed.path), route([a, b])[0], [a, b], [0, 1, -1], tolerance=0.0, rtol=0.0)
    assert rows.ok and rows.noise == "torch fp32 against float64", rows.summary()
