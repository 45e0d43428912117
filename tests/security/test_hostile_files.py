"""A model file never runs code: every command that opens a file, given a crafted one, exits 2 with one line,
creates no marker and writes nothing. The hostile files are made here, on the fly, from a real adapted model."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.errors import SurgeryError
from tests.security.hostile import Payload, edit_json, raw_payload, replace_member, torch_payload

SAMPLE = "data/sample_inputs/model.pt"


def hostile_pt2(adapted: Path, folder: Path, marker: Path) -> Path:
    """The adapted model with its sample inputs replaced by a torch.save pickle that runs `touch marker`."""
    return replace_member(adapted, folder / "evil.adapted.pt2", SAMPLE, torch_payload(marker))


def refused(run, folder: Path, before: list[str], marker: Path, *words: str) -> None:
    """Exit 2, one `error:` line (containing `words`), no traceback, no marker, nothing new in `folder`."""
    assert not marker.exists(), "the file ran code"
    assert run.code == 2, (run.code, run.stderr[-2000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), run.stderr[-2000:]
    assert all(line.startswith("✓") for line in lines if line not in errors), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in folder.rglob("*")) == before


def _fake_engine(folder: Path) -> str:
    (folder / "m.plan").write_bytes(b"not an engine")
    (folder / "m.plan.json").write_text(json.dumps({"precision": "fp32", "source_onnx": "m.onnx", "onnx_meta": {}}))
    return "m.plan"


def _peft_folder(folder: Path) -> str:
    (folder / "peft").mkdir()
    return "peft"


def _adapterhub_folder(folder: Path) -> str:
    """A real AdapterHub folder (read before the base is opened, so it must pass on its own)."""
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "adapterhub" / "gpt2-pfeiffer", folder / "hub")
    return "hub"


# For each command that opens a .pt2: its arguments, given the hostile file's name and the work folder.
COMMANDS = {
    "inspect": lambda evil, t: ["inspect", evil],
    "insert": lambda evil, t: ["insert", "--r", "2", evil, "-o", "out.adapted.pt2"],
    "export": lambda evil, t: ["export", evil, "--onnx", "-o", "out.onnx"],
    "export-swappable": lambda evil, t: ["export", evil, "--swappable", "-o", "out.onnx"],
    "pack": lambda evil, t: ["pack", evil, "-o", "out.safetensors"],
    "merge": lambda evil, t: ["merge", evil, "-o", "out.pt2"],
    "merge-stack": lambda evil, t: ["merge", evil, evil, "--stack", "-o", "out.pt2"],
    "import-peft": lambda evil, t: ["import-peft", _peft_folder(t), "--base", evil, "-o", "out.adapted.pt2"],
    "import-adapters": lambda evil, t: ["import-adapters", _adapterhub_folder(t), "--base", evil, "-o", "o.pt2"],
    "export-peft": lambda evil, t: ["export-peft", evil, "-o", "out.peft"],
    "run": lambda evil, t: ["run", _fake_engine(t), "--against", evil],
}


@pytest.mark.parametrize(
    "command", [c if c == "inspect" else pytest.param(c, marks=pytest.mark.slow) for c in COMMANDS]
)  # one command in `make test`, every command in `make test-slow`
def test_crafted_pt2_runs_no_code(command, adapted_pt2, tmp_path, cli):
    marker = tmp_path / "MARKER"
    evil = hostile_pt2(adapted_pt2, tmp_path, marker)
    args = COMMANDS[command](evil.name, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = cli(*args, cwd=tmp_path)
    refused(run, tmp_path, before, marker, "sample_inputs/model.pt", "--trust", "re-save")


def _protocol0(marker: Path) -> bytes:
    return raw_payload(marker, protocol=0)  # plain text, no PROTO header: found by content, not by its first byte


def _expression(marker: Path):
    """A shape expression torch hands to sympy.sympify, which evaluates it with Python's eval."""

    def change(doc):
        text = (
            json.dumps(doc)
            .replace("Symbol('", f"Add(__import__('os').system('touch {marker}'), Symbol('", 1)
            .replace("integer=True)", "integer=True))", 1)
        )
        doc.clear()
        doc.update(json.loads(text))

    return edit_json("", change)


def _node_target(doc):
    node = doc["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.os.system"


def _guard(marker: Path):
    return edit_json("", lambda doc: doc.update(guards_code=[f"__import__('os').system('touch {marker}') == 0"]))


# Other places an archive could carry code: (member suffix, new content or edit, words the error names)
VARIANTS = {
    "protocol-0 pickle": (SAMPLE, lambda m: _protocol0(m), None, "sample_inputs/model.pt"),
    "raw pickle under another name": ("extra/surgery.json", None, None, "extra/surgery.json"),
    "eval in a shape expression": ("models/model.json", None, "expr", "shape expression"),
    "graph node calling os.system": ("models/model.json", None, "target", "torch.os.system"),
    "exec in a guard": ("models/model.json", None, "guard", "guard"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_code_in_an_archive_is_refused(variant, adapted_pt2, tmp_path):
    """In process, through the loader every command uses (the commands themselves are run above)."""
    from surgery.load import load

    marker = tmp_path / "MARKER"
    suffix, make, edit, words = VARIANTS[variant]
    if variant == "raw pickle under another name":
        replace_member(adapted_pt2, tmp_path / "evil.pt2", suffix, raw_payload(marker, protocol=4))
    elif make is not None:
        replace_member(adapted_pt2, tmp_path / "evil.pt2", suffix, make(marker))
    else:
        change = {"expr": _expression(marker), "target": edit_json("", _node_target), "guard": _guard(marker)}[edit]
        replace_member(adapted_pt2, tmp_path / "evil.pt2", suffix, edit=change)
    with pytest.raises(SurgeryError, match=words) as info:
        load(tmp_path / "evil.pt2")
    assert not marker.exists() and "--trust" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow  # subprocesses that capture and export
def test_trust_opens_a_legitimately_pickled_pt2(adapted_pt2, tmp_path, cli):
    """Sample inputs pickled with a harmless global outside torch's allow-list: refused, then opened with --trust."""
    import collections
    import io

    with __import__("zipfile").ZipFile(adapted_pt2) as zf:
        inner = zf.read(next(n for n in zf.namelist() if n.endswith(SAMPLE)))
    args, kwargs = torch.load(io.BytesIO(inner), weights_only=True)
    buf = io.BytesIO()
    torch.save((args, collections.defaultdict(None, kwargs)), buf)  # a dict subclass torch's allow-list lacks
    pt2 = replace_member(adapted_pt2, tmp_path / "dated.adapted.pt2", SAMPLE, buf.getvalue())
    run = cli("inspect", pt2.name, "--json", cwd=tmp_path)
    assert run.code == 2 and "collections.defaultdict" in run.stderr and "--trust" in run.stderr, run.stderr[-2000:]
    run = cli("inspect", pt2.name, "--json", "--trust", cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    assert run.json["adapter"]["method"] == "houlsby"


def test_files_this_tool_writes_open_without_trust(adapted_pt2, lora_pt2, tiny_pt2, tmp_path, cli):
    """insert's (the fixtures), merge's (with its LoRA pack inside) and plain torch.export.save's (tiny_pt2).
    `export --fused-pt2` checks its own output before it is written (exporters/kernel_program.py)."""
    from surgery.safe_files import check_pt2

    run = cli("merge", lora_pt2, "-o", tmp_path / "merged.pt2", "--json")
    assert run.code == 0, run.stderr[-2000:]
    for path in (adapted_pt2, lora_pt2, tiny_pt2, tmp_path / "merged.pt2"):
        check_pt2(path, path.name)  # raises if anything in it would be refused


def test_zip_bomb_member_is_refused(adapted_pt2, tmp_path, cli):
    """A member that deflates from a few hundred KB to 400 MB: refused from the sizes the archive declares."""
    import zipfile

    bomb = tmp_path / "bomb.adapted.pt2"
    bomb.write_bytes(adapted_pt2.read_bytes())
    with (
        zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as zf,
        zf.open("small.adapted/extra/bomb", "w", force_zip64=True) as fh,
    ):
        zeros = bytes(1 << 20)
        for _ in range(400):
            fh.write(zeros)
    assert bomb.stat().st_size < 4 << 20
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = cli("inspect", bomb.name, cwd=tmp_path)
    refused(run, tmp_path, before, tmp_path / "none", "extra/bomb", "zip bomb")


def _onnx_with_external(folder: Path, location: str, write: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], vals=np.zeros(4, dtype=np.float32).tobytes(), raw=True)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    if write:
        (folder / location).write_bytes(np.arange(4, dtype=np.float32).tobytes())
    return path


EXTERNAL = [
    ("../../../../../../etc/hostname", "outside the model's folder", True),
    ("/etc/hostname", "outside the model's folder", False),
    ("weights.bin", "missing", True),
]


@pytest.mark.parametrize("location, words, subprocess", EXTERNAL, ids=[e[0] for e in EXTERNAL])
def test_onnx_external_data_must_stay_beside_the_model(location, words, subprocess, tmp_path, cli):
    from exporters.runtime import AdaptedSession
    from exporters.trt_check import check_trt

    _onnx_with_external(tmp_path, location)
    with pytest.raises(SurgeryError, match=words):
        AdaptedSession(tmp_path / "m.onnx")
    with pytest.raises(SurgeryError, match=words):
        check_trt(tmp_path / "m.onnx")  # `surgery check-trt`
    if subprocess:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        run = cli("run", "m.onnx", "--shape", "batch=1", cwd=tmp_path)
        refused(run, tmp_path, before, tmp_path / "none", words)


def test_onnx_external_data_beside_the_model_runs(tmp_path, cli):
    _onnx_with_external(tmp_path, "weights.bin", write=True)
    np.savez(tmp_path / "x.npz", x=np.ones(4, dtype=np.float32))
    run = cli("run", "m.onnx", "--input", "x.npz", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    assert run.json["outputs"]["y"]["mean"] == pytest.approx(2.5)  # 1 + mean(0, 1, 2, 3)


def _pack(adapted_pt2: Path, folder: Path) -> Path:
    from surgery.packs import pack_from_model, save_pack
    from surgery.pipeline import open_model

    captured = open_model(str(adapted_pt2))
    return save_pack(pack_from_model(captured.gm.state_dict(), captured.manifest), folder / "a.safetensors")


def test_safetensors_header_that_lies_is_refused(adapted_pt2, tmp_path, cli):
    from surgery.packs import load_pack

    good = _pack(adapted_pt2, tmp_path).read_bytes()
    assert load_pack(tmp_path / "a.safetensors").rank == 4
    n = struct.unpack("<Q", good[:8])[0]
    cases = {
        "long.safetensors": struct.pack("<Q", 1 << 40) + good[8:],  # header longer than the file
        "offsets.safetensors": _shift_offsets(good, n),  # a tensor's bytes beyond the data
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a.safetensors").unlink()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for name in cases:
        with pytest.raises(SurgeryError, match=name):
            load_pack(tmp_path / name)
    engine = _fake_engine(tmp_path)
    for args in (
        ["inspect", "long.safetensors"],
        ["pack", "offsets.safetensors", "-o", "b.onnx_adapter"],
        ["swap", engine, "long.safetensors"],
    ):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        refused(
            cli(*args, cwd=tmp_path), tmp_path, before, tmp_path / "none", args[-1] if args[0] == "swap" else args[1]
        )


def _shift_offsets(data: bytes, n: int) -> bytes:
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, len(data)]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def test_pickled_pack_for_swap_runs_no_code(tmp_path, cli):
    marker = tmp_path / "MARKER"
    (tmp_path / "task.safetensors").write_bytes(raw_payload(marker))
    engine = _fake_engine(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    refused(cli("swap", engine, "task.safetensors", cwd=tmp_path), tmp_path, before, marker, "task.safetensors")


def test_swap_with_a_sidecar_that_is_not_json(tmp_path, cli):
    _fake_engine(tmp_path)
    (tmp_path / "m.plan.json").write_text("{not json")
    (tmp_path / "task.safetensors").write_bytes(b"")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    refused(cli("swap", "m.plan", "task.safetensors", cwd=tmp_path), tmp_path, before, tmp_path / "none", "sidecar")


def _config(folder: Path, text: str) -> str:
    (folder / "config.json").write_text(text)
    return "config.json"


def _remote_code(folder: Path, marker: Path) -> str:
    from transformers import BertConfig

    from tests.security.conftest import BERT

    config = BertConfig(**BERT).to_dict()
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return _config(folder, json.dumps(config))


CONFIGS = {
    "nested 100000 deep": (lambda t, m: _config(t, '{"a": ' * 100_000 + "1" + "}" * 100_000), "nests"),
    "20 MB": (lambda t, m: _config(t, json.dumps({"model_type": "bert", "pad": "x" * (20 << 20)})), "absurd"),
    "auto_map remote code": (_remote_code, "auto_map"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CONFIGS)
def test_hostile_config_json(case, tmp_path, cli):
    make, words = CONFIGS[case]
    marker = tmp_path / "MARKER"
    name = make(tmp_path, marker)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    refused(cli("inspect", name, cwd=tmp_path), tmp_path, before, marker, words)


@pytest.mark.slow  # subprocesses that capture and export
def test_peft_bin_loads_tensors_only(small_bert, tmp_path, cli):
    """adapter_model.bin: a pickle that runs code is refused; a plain state dict of tensors imports."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil"
    evil.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], "bias": "none"}
    (evil / "adapter_config.json").write_text(json.dumps(config))
    torch.save({"x": Payload(marker)}, evil / "adapter_model.bin")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = cli("import-peft", "evil", "--base", small_bert, "-o", "out.adapted.pt2", cwd=tmp_path)
    refused(run, tmp_path, before, marker, "adapter_model.bin", "safetensors")

    good = tmp_path / "good"
    good.mkdir()
    (good / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        key = f"base_model.model.encoder.layer.{layer}.attention.self.query"
        tensors[f"{key}.lora_A.weight"] = torch.randn(2, 32, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(32, 2, generator=g)
    torch.save(tensors, good / "adapter_model.bin")
    run = cli("import-peft", "good", "--base", small_bert, "-o", "good.adapted.pt2", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    assert len(run.json["sites"]) == 2 and run.json["trainable_params"] == 2 * (2 * 32 + 2 * 32)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "a\\b", ""])
def test_names_that_become_paths_are_refused(name, tmp_path):
    from exporters.triton import write_triton_repo
    from runtime.files import check_name

    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(SurgeryError, match="Triton model name"):
        write_triton_repo(tmp_path / "repo", tmp_path / "m.onnx", tmp_path / "m.onnx", None, name)  # type: ignore[arg-type]
    assert not (tmp_path / "repo").exists() and not (tmp_path / "evil").exists()
    with pytest.raises(SurgeryError, match="pack name"):
        check_name(name, "pack name")


def test_run_input_npz_with_pickled_objects_runs_no_code(tmp_path, cli):
    marker = tmp_path / "MARKER"
    _onnx_with_external(tmp_path, "weights.bin", write=True)
    np.savez(tmp_path / "x.npz", x=np.array([Payload(marker)], dtype=object))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    refused(cli("run", "m.onnx", "--input", "x.npz", cwd=tmp_path), tmp_path, before, marker, "x.npz")
