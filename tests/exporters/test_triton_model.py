"""The Python-backend model of a Triton repository, without the server: the repository files `write_python_model`
writes and `Runner`, what the model does with a batch of requests (mixed adapters, unknown ones, bad inputs).
The server itself: tests/exporters/test_triton_server.py. The tests with exports carry the `triton` marker (make
test-triton: two small GPT-2 exports are too slow for make test); parsing and refusals run in make test."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from exporters.runtime import AdaptedSession
from exporters.swappable import export_routed, export_swappable
from exporters.triton import write_python_model, write_triton_repo
from exporters.triton_model import Request, Runner, adapter_of
import runtime
from exporters import triton_model
from exporters.verify import ort_session
from surgery import __version__
from surgery.errors import SurgeryError
from surgery.packs import pack_from_model, save_pack
from surgery.parity import compare
from surgery.pipeline import open_model
from tests.conftest import make_adapted


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_config):
    folder = tmp_path_factory.mktemp("triton_model")
    base = open_model(str(small_config("gpt2")))
    a, b = make_adapted(base, folder, 4, seed=0), make_adapted(base, folder, 8, seed=1)
    export_routed([a, b], folder / "r.onnx")
    export_swappable(a, folder / "s.onnx")
    repo = folder / "repo"
    packs = {n: pack_from_model(m.gm.state_dict(), m.manifest) for n, m in (("a", a), ("b", b))}
    routed = write_python_model(repo, folder / "r.onnx", base.signature, "r", "routed", adapters=["a", "b"])
    ort_routed = write_triton_repo(repo, folder / "r.onnx", folder / "r.onnx", base.signature, "r", adapters=["a", "b"])
    grouped = write_python_model(
        repo, folder / "r.onnx", base.signature, "g", "routed", adapters=["a", "b"], group_by_adapter=True
    )
    swap = write_python_model(repo, folder / "s.onnx", base.signature, "s", "swappable", packs=packs)
    reference = AdaptedSession(folder / "s.onnx")  # another ONNX file, run request by request
    for name, pack in packs.items():
        reference.load(name, pack)
    rng = np.random.default_rng(0)
    x = [
        {"input_ids": rng.integers(0, 1000, (rows, 12)), "attention_mask": np.ones((rows, 12), np.int64)}
        for rows in (1, 2, 1, 3)
    ]
    return {
        "routed": routed, "grouped": grouped, "swap": swap, "ort": ort_routed, "reference": reference, "x": x,
        "base": base, "models": [a, b],
    }  # fmt: skip


class Counting:
    """The real ONNX Runtime session, counting its runs in `runs` (shared between the sessions of one model)."""

    def __init__(self, session, runs: list):
        self.session, self.runs = session, runs

    def run(self, *args):
        self.runs.append(1)
        return self.session.run(*args)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _runner(repo_model):
    """The model as Triton's stub would make it, with the parameters of its config.pbtxt."""
    pairs = re.findall(r'key: "([^"]+)" value: \{ string_value: ("(?:[^"\\]|\\.)*") \}', repo_model.config.read_text())
    return Runner(repo_model.folder, "1", {k: json.loads(v) for k, v in pairs})


@pytest.mark.triton
def test_repository_files(setup):
    text = setup["routed"].config.read_text()
    assert 'backend: "python"' in text and "dynamic_batching" in text and "max_batch_size: 64" in text
    assert 'name: "adapter"' in text and "optional: true" in text and "TYPE_STRING" in text
    assert "adapter_id" not in text and "adapters." not in text  # fed by the model, not by clients
    assert '"surgery.adapters" value: { string_value: "[\\"a\\", \\"b\\"]" }' in text
    assert '"surgery.version" value: { string_value: "%s" }' % __version__ in text
    assert f"written by surgery {__version__}" in (setup["routed"].folder / "1" / "model.py").read_text()
    copied = (setup["routed"].folder / "1" / "surgery_model.py").read_text()
    assert copied == Path(triton_model.__file__).read_text()  # the runtime code travels with the model
    package = Path(runtime.__file__).parent
    assert (setup["routed"].folder / "1" / "runtime" / "adapted.py").read_text() == (package / "adapted.py").read_text()
    assert sorted(p.name for p in (setup["swap"].folder / "adapters").iterdir()) == ["a.onnx_adapter", "b.onnx_adapter"]
    assert (setup["swap"].folder / "1" / "base.onnx").is_file()  # the base-only graph, cut out at export


def test_model_code_imports_nothing_of_the_tool():
    """The copied model code imports numpy, onnxruntime, the standard library and the runtime package (copied with
    it); the names it repeats are the exporter's. That the runtime needs no more is tests/runtime's border test,
    and the Triton tier runs the folder in an environment of numpy and onnxruntime alone."""
    import ast
    import sys

    tree = ast.parse(Path(triton_model.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - set(sys.stdlib_module_names) == {"numpy", "onnxruntime", "runtime", "triton_python_backend_utils"}
    from exporters import triton

    assert (triton_model.PARAM, triton_model.ADAPTER_INPUT, triton_model.ROUTE_INPUT) == (
        triton.PARAM, triton.ADAPTER_INPUT, triton.ROUTE_INPUT,
    )  # fmt: skip


@pytest.mark.triton
def test_a_pack_for_another_model_fails_the_load(setup, tmp_path, small_config):
    """A pack dropped into adapters/ is checked at load with ONNX Runtime alone: made for another base, refused."""
    import shutil

    folder = tmp_path / "s-python"
    shutil.copytree(setup["swap"].folder, folder)
    other = open_model(str(small_config("llama")))
    stray = make_adapted(other, tmp_path, 4, seed=3)
    save_pack(pack_from_model(stray.gm.state_dict(), stray.manifest), folder / "adapters" / "z.onnx_adapter")
    with pytest.raises(SurgeryError, match="z.onnx_adapter was made for another model"):
        _runner(setup["swap"].__class__(folder, folder / "config.pbtxt", folder / "1" / "model.onnx", 64))


@pytest.mark.triton
@pytest.mark.parametrize("model", ["routed", "grouped", "swap"])
def test_a_mixed_batch_matches_each_adapter_alone(setup, model):
    runner = _runner(setup[model])
    runs: list = []
    runner.ort, runner.base = Counting(runner.ort, runs), Counting(runner.base, runs)
    plan = [(0, "a"), (1, "b"), (2, None), (3, "nope"), (1, "a"), (0, "b")]
    requests = [Request(dict(setup["x"][i]), a) for i, a in plan]
    requests.append(Request({"input_ids": setup["x"][0]["input_ids"]}, "a"))  # no attention_mask
    bad = dict(setup["x"][2], input_ids=np.full((1, 12), 10**6))  # a token id past the vocabulary: ORT fails
    requests.append(Request(bad, "b"))
    results = runner.run(requests)
    for (i, adapter), got in zip(plan, results):
        if adapter == "nope":
            assert isinstance(got, SurgeryError) and "unknown adapter 'nope'" in str(got)
            continue
        want = setup["reference"].run(setup["x"][i], adapter=adapter)
        parity = compare(want, got, where=f"{model} {adapter} input {i}")
        assert parity.ok, parity.summary()
    assert isinstance(results[-2], SurgeryError) and "missing input 'attention_mask'" in str(results[-2])
    assert isinstance(results[-1], SurgeryError) and "inference failed" in str(results[-1])
    # routed: one call for the 6 valid requests of one shape, which fails on the bad one: each again alone (1 + 6);
    # grouped: one call per adapter (a, b, base), and b's group of 3 holds the bad one (3 + 3)
    assert len(runs) == (7 if model == "routed" else 6), len(runs)


ORT_TYPES = {"TYPE_INT64": "tensor(int64)", "TYPE_FP32": "tensor(float)", "TYPE_INT32": "tensor(int32)"}


@pytest.mark.triton
def test_routed_model_config_for_the_onnx_runtime_backend(setup):
    """The bundled server has no ONNX Runtime backend, so the routed model's config is checked statically: parsed
    by Triton's own ModelConfig schema, and every tensor's name, type and shape (batch axis, reshape) against what
    ONNX Runtime reports for the model file."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(setup["ort"].config.read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and not config.backend and config.name == "r"
    assert config.max_batch_size == 64 and config.HasField("dynamic_batching")
    assert json.loads(config.parameters["surgery.adapters"].string_value) == ["a", "b"]
    session = ort_session(setup["ort"].model)
    for tensors, described in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        onnx_side = {t.name: (t.type, [d if isinstance(d, int) else -1 for d in t.shape]) for t in described}
        triton_side = {}
        for t in tensors:
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            triton_side[t.name] = (ORT_TYPES[model_config_pb2.DataType.Name(t.data_type)], [-1, *dims])
        assert triton_side == onnx_side
    route = next(t for t in config.input if t.name == "adapter_id")
    assert list(route.dims) == [1] and route.HasField("reshape") and list(route.reshape.shape) == []


@pytest.mark.triton
def test_routed_ids_out_of_range_run_the_base_model(setup):
    """One batch is one ONNX Runtime call on Triton's own backend: ids past either end must not fail it. Each row
    against torch: the base model for an id out of range, the adapted model for a valid one."""
    base, (a, b) = setup["base"], setup["models"]
    sig = base.signature
    session = ort_session(setup["ort"].model)
    tensors = sig.examples({"batch": 5, "seq": 12}, seed=3, pad=True)
    ids = np.array([2, 0, -1, np.iinfo(np.int64).max, 1], dtype=np.int64)
    feeds = {n: t.numpy() for n, t in zip(sig.names, tensors)} | {"adapter_id": ids}
    got = session.run(None, feeds)
    from surgery.parity import mask_of, outputs_of
    from exporters.swappable import _with_adapters

    want = {
        "base": outputs_of(_with_adapters(a.gm, "base"), sig, tensors),
        0: outputs_of(a.gm, sig, tensors),
        1: outputs_of(b.gm, sig, tensors),
    }
    mask = mask_of(sig, tensors)
    for row, i in enumerate(ids.tolist()):
        ref = want[i if i in (0, 1) else "base"]
        one = None if mask is None else mask[row : row + 1]
        rows = compare([t[row : row + 1] for t in ref], [o[row : row + 1] for o in got], mask=one, where=f"id {i}")
        assert rows.ok, rows.summary()
    adapted = compare([t[1:2] for t in want[0]], [o[1:2] for o in want["base"]], where="a vs base")
    assert not adapted.ok  # the adapters are not the identity: the rows above tell the models apart


@pytest.mark.triton
def test_plain_model_refuses_an_adapter(setup, tmp_path):
    base = setup["base"]
    from exporters.onnx import export_onnx

    export_onnx(base.gm, base.signature, tmp_path / "base.onnx")
    model = write_python_model(tmp_path / "repo", tmp_path / "base.onnx", base.signature, "base", "plain")
    runner = _runner(model)
    ok, refused = runner.run([Request(dict(setup["x"][0])), Request(dict(setup["x"][0]), "a")])
    assert isinstance(ok, list) and isinstance(refused, SurgeryError) and "--swappable or --route" in str(refused)


def test_adapter_from_parameter_or_input():
    assert adapter_of('{"adapter": "a"}', None) == "a"
    assert adapter_of(None, np.array([[b"b"], [b"b"]], dtype=object)) == "b"
    assert adapter_of("{}", np.array([[b""]], dtype=object)) is None
    with pytest.raises(SurgeryError, match="one adapter per request"):
        adapter_of(None, np.array([[b"a"], [b"b"]], dtype=object))
    with pytest.raises(SurgeryError, match="disagree"):
        adapter_of('{"adapter": "a"}', np.array([[b"b"]], dtype=object))


def test_serve_without_pytriton_is_one_line(monkeypatch, tmp_path):
    from exporters import triton_server

    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "config.pbtxt").write_text('backend: "python"\n')
    real = importlib.util.find_spec
    monkeypatch.setattr(triton_server.importlib.util, "find_spec", lambda n: None if n == "pytriton" else real(n))
    with pytest.raises(SurgeryError, match="pip install --no-deps nvidia-pytriton"):
        triton_server.start_server(tmp_path / "repo")
    with pytest.raises(SurgeryError, match="not a Triton model repository"):
        triton_server.start_server(tmp_path)


def test_inspect_and_triton_env_refusals_are_one_line(cli, tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    for args, says in (
        (["inspect", "missing.onnx"], "no such file"),
        (["inspect", "x.onnx"], "not a readable ONNX model"),
        (["export", "minilm", "--triton-env", "env"], "give --triton-repo too"),
    ):
        run = cli(*args, cwd=tmp_path)
        assert run.code == 2 and says in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
