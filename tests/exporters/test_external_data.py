"""ONNX external data: NAME.onnx + NAME.onnx.data, written as a pair (both or neither), on a model of a few MB
forced over the threshold, and read by every consumer: verification, AdaptedSession, `surgery run`, Triton."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import exporters.onnx as onnx_exporter
from exporters.onnx import export_onnx
from exporters.onnx_files import THRESHOLD_ENV, onnx_files
from exporters.runtime import AdaptedSession
from exporters.swappable import export_routed, export_swappable
from exporters.triton import write_triton_repo
from exporters.verify import ort_session
from surgery.adapters import AdapterSpec
from surgery.errors import SurgeryError
from surgery.packs import pack_from_model
from surgery.pipeline import open_model, stand_in_adapted
from runtime.files import check_onnx_data


@pytest.fixture(scope="module")
def gpt2(small_config, tmp_path_factory):
    """A small GPT-2 (under 1 MB of weights), adapted with distinct random Houlsby weights, as a saved .pt2."""
    captured = open_model(str(small_config("gpt2")))
    path = tmp_path_factory.mktemp("adapted") / "gpt2.adapted.pt2"
    return captured, stand_in_adapted(captured, AdapterSpec("houlsby", r=4), path, seed=3)


def assert_pair(path):
    data = path.with_name(path.name + ".data")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, data.name])
    model = onnx.load(str(path), load_external_data=False)
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.value == data.name for i in external for e in i.external_data if e.key == "location")
    inline = [i.name for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert all(
        model.graph.initializer[k].ByteSize() < 1100 for k, i in enumerate(model.graph.initializer) if i.name in inline
    )
    check_onnx_data(path)


@pytest.fixture(scope="module")
def pair(gpt2, tmp_path_factory):
    _, adapted = gpt2
    path = tmp_path_factory.mktemp("pair") / "gpt2.onnx"
    return export_onnx(adapted.gm, adapted.signature, path, external=True)


def test_external_data_flag_writes_a_verified_pair(pair):
    assert_pair(pair.path)
    assert pair.data == pair.path.with_name("gpt2.onnx.data") and pair.parity.ok
    assert onnx_files(pair.path) == [pair.path, pair.data]


@pytest.mark.slow
def test_over_the_threshold_swappable_pair_takes_packs(tmp_path, gpt2, monkeypatch):
    _, adapted = gpt2
    monkeypatch.setenv(THRESHOLD_ENV, "100000")  # the model has a few MB of initializers
    path = tmp_path / "gpt2.swappable.onnx"
    result = export_swappable(adapted, path)  # checks no pack = base and own pack = adapted on the pair
    assert_pair(path)
    session = AdaptedSession(path)
    session.load("own", pack_from_model(adapted.gm.state_dict(), adapted.manifest))
    ids = {"input_ids": np.array([[1, 2, 3, 4]], dtype=np.int64), "attention_mask": np.ones((1, 4), dtype=np.int64)}
    base, own = session.run(ids)[0], session.run(ids, adapter="own")[0]
    assert result.pack_parity.ok and np.abs(base - own).max() > 1e-3  # the pack is active, and it changes outputs


@pytest.mark.slow
def test_under_the_threshold_is_one_file(tmp_path, gpt2):
    _, adapted = gpt2
    path = tmp_path / "gpt2.onnx"
    path.with_name("gpt2.onnx.data").write_bytes(b"stale data of an earlier pair")
    export_onnx(adapted.gm, adapted.signature, path)
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2.onnx"]  # the stale half of the old pair is gone


@pytest.mark.slow
def test_routed_pair(tmp_path, gpt2, monkeypatch):
    base, _ = gpt2
    models = [
        stand_in_adapted(base, AdapterSpec("houlsby", r=4), tmp_path / f"m{k}.adapted.pt2", seed=k) for k in range(2)
    ]
    monkeypatch.setenv(THRESHOLD_ENV, "100000")
    out = tmp_path / "out"
    out.mkdir()
    result = export_routed(models, out / "r.routed.onnx")
    assert_pair(out / "r.routed.onnx")
    assert result.rows.ok


@pytest.mark.slow
def test_a_failed_check_leaves_neither_file_and_keeps_the_old_pair(tmp_path, gpt2, monkeypatch):
    _, adapted = gpt2
    monkeypatch.setattr("surgery.parity.NOISE_K", 0.0)  # no allowance at all: fp32 rounding alone fails
    path = tmp_path / "gpt2.onnx"
    export_onnx(adapted.gm, adapted.signature, path, external=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SurgeryError, match="nothing was written"):
        export_onnx(adapted.gm, adapted.signature, path, external=True, tolerance=0.0, rtol=0.0)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(SurgeryError, match="nothing was written"):
        export_onnx(adapted.gm, adapted.signature, fresh / "gpt2.onnx", external=True, tolerance=0.0, rtol=0.0)
    assert list(fresh.iterdir()) == []


@pytest.mark.slow
def test_an_interrupted_write_leaves_neither_file(tmp_path, gpt2, monkeypatch):
    _, adapted = gpt2

    def interrupted(path, what):  # Ctrl-C after both files are written, before they move into place
        assert path.with_name(path.name + ".data").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_exporter, "check_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(adapted.gm, adapted.signature, tmp_path / "gpt2.onnx", external=True)
    assert list(tmp_path.iterdir()) == []


def test_triton_repo_carries_the_data_file(tmp_path, gpt2, pair):
    _, adapted = gpt2
    path = pair.path
    repo = write_triton_repo(tmp_path / "repo", path, path, adapted.signature, "gpt2")
    assert sorted(p.name for p in repo.model.parent.iterdir()) == ["gpt2.onnx.data", "model.onnx"]
    session = ort_session(repo.model)
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    direct = ort_session(path).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    served = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    np.testing.assert_array_equal(direct, served)


@pytest.mark.slow
def test_cli_export_and_run_take_the_pair(tmp_path, cli, small_config):
    config = small_config("gpt2")
    r = cli("export", config, "--external-data", "-o", tmp_path / "g.onnx", "--json")
    assert r.code == 0, r.stderr
    assert r.json["external_data"] == str(tmp_path / "g.onnx.data")
    assert_pair(tmp_path / "g.onnx")
    r = cli("run", tmp_path / "g.onnx", "--shape", "batch=2,seq=5", "--json")
    assert r.code == 0, r.stderr
    assert [o["shape"][:2] for o in r.json["outputs"].values()][0] == [2, 5]
    r = cli("check-trt", tmp_path / "g.onnx", "--json")
    assert r.code in (0, 1) and r.json["operators"], r.stderr  # the pair read, its operators reported
    (tmp_path / "g.onnx.data").unlink()
    for command in ("run", "check-trt"):
        r = cli(command, tmp_path / "g.onnx")
        assert r.code == 2 and "missing beside the model" in r.stderr
