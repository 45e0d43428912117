"""Streamed export of a `.pt2` (surgery/archive.py into exporters/stream.py): an `.adapted.pt2` written by `surgery
insert` on a tiny causal LM, its adapters given distinct random weights as training would, exported with `--stream`
and by the budget's own switch (exporters/budget.py); the pair runs in ONNX Runtime to torch's outputs, and a damaged
weight record in the archive is refused block by block with nothing written. Slow tier: each export runs torch.onnx."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from exporters.budget import BUDGET_ENV
from exporters.verify import check_onnx
from surgery.archive import capture_pt2_meta
from surgery.bundle import MANIFEST
from surgery.parity import tolerances
from surgery.pipeline import open_model
from tests.checkpoints import write_checkpoint

pytestmark = pytest.mark.slow


def random_adapters(path, seed: int, method: str) -> None:
    """Distinct random values for every adapter tensor of the archive (a zero up-projection is the base model),
    saved back with its manifest."""
    extra = {MANIFEST: ""}
    program = torch.export.load(path, extra_files=extra)
    g = torch.Generator().manual_seed(seed)
    state = program.state_dict
    names = [n for n in state if n.startswith("adapters.")]
    assert names, "no adapters in the archive"
    with torch.no_grad():
        for name in names:
            state[name].copy_(torch.randn(state[name].shape, generator=g) * 0.05)
    torch.export.save(program, path, extra_files=extra)


@pytest.fixture(scope="module")
def adapted(cli, tmp_path_factory):
    """Two `.adapted.pt2` of one tiny Llama (a causal LM with its KV cache): LoRA and Houlsby, random adapters."""
    root = tmp_path_factory.mktemp("pt2")
    folder = write_checkpoint(root / "llama", "llama")
    made = {}
    for seed, method in enumerate(("lora", "houlsby"), start=1):
        path = root / f"{method}.adapted.pt2"
        run = cli("insert", folder, "--method", method, "--r", "4", "-o", path, cwd=root)
        assert run.code == 0, run.stderr
        random_adapters(path, seed, method)
        made[method] = path
    return made


def test_archive_weights_are_the_programs_tensor_by_tensor(adapted):
    captured = capture_pt2_meta(str(adapted["lora"]))
    loaded = torch.export.load(adapted["lora"]).state_dict
    assert captured.task == "causal-lm" and captured.manifest is not None
    assert set(captured.keys.values()) == {n for n in loaded if not n.startswith("adapters.")}
    dtypes = {k: loaded[k].dtype for k in captured.keys.values()}
    read = dict(captured.checkpoint.read(dtypes))
    assert read.keys() == dtypes.keys()
    for name, t in read.items():
        assert torch.equal(t, loaded[name]), name
    params = dict(captured.gm.named_parameters())
    adapters = [n for n in params if n.startswith("adapters.")]
    assert adapters and all(torch.equal(params[n], loaded[n]) for n in adapters)  # real, not fake


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_cli_streams_an_adapted_pt2_to_torchs_outputs(cli, adapted, method, tmp_path):
    run = cli("export", adapted[method], "--stream", "-o", "m.onnx", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    data = run.json
    assert data["blockwise"]["ok"] and data["from_checkpoint"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    model = open_model(str(adapted[method]))  # the whole model in torch, against the whole ONNX model
    atol, rtol = tolerances(torch.float32)
    parity = check_onnx(tmp_path / "m.onnx", model.gm, model.signature, tolerance=atol, rtol=rtol)
    assert parity.ok, parity.summary()


def test_export_streams_by_itself_past_the_memory_budget(cli, adapted, tmp_path, monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "100K")
    run = cli("export", adapted["lora"], "-o", "auto.onnx", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "streaming it instead" in line]
    assert len(lines) == 1 and f"${BUDGET_ENV}" in lines[0], run.stderr
    assert run.json["blockwise"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx", "auto.onnx.data"]
    monkeypatch.setenv(BUDGET_ENV, "100G")  # room enough: the in-memory export, one file
    run = cli("export", adapted["lora"], "-o", "memory.onnx", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "streaming" not in run.stderr and "blockwise" not in run.json
    assert (tmp_path / "memory.onnx").is_file() and not (tmp_path / "memory.onnx.data").exists()


def test_a_damaged_weight_in_the_archive_is_refused_block_by_block(cli, adapted, tmp_path):
    """The pair of a .pt2, one base weight reversed in its data file: the block-wise check of the archive's capture
    names the block that holds it."""
    captured = capture_pt2_meta(str(adapted["lora"]))
    record = captured.checkpoint.records["model.layers.1.mlp.down_proj.weight"]
    good = tmp_path / "good.onnx"
    run = cli("export", adapted["lora"], "--stream", "-o", good, "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    from exporters.blockwise import verify_blockwise
    from tests.exporters.streamed import arrays

    model, _ = arrays(good)
    tensor = next(t for t in model.graph.initializer if t.name == "model.layers.1.mlp.down_proj.weight")
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    assert length == record.length
    data = good.with_name(good.name + ".data")
    raw = bytearray(data.read_bytes())
    raw[offset : offset + length] = np.frombuffer(raw, np.uint8, length, offset)[::-1].tobytes()
    data.write_bytes(bytes(raw))
    atol, rtol = tolerances(captured.dtype)
    report = verify_blockwise(captured, good, tolerance=atol, rtol=rtol)
    assert report.failing == ["block 1"], report.markdown()


def test_cli_streams_an_adapted_pt2_swappable_with_its_pack(cli, adapted, tmp_path):
    run = cli("export", adapted["houlsby"], "--stream", "--swappable", "-o", "m.swappable.onnx", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    data = run.json
    assert data["blockwise"]["ok"] and data["blockwise_no_pack"]["ok"] and data["adapter_tensors"] > 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.onnx_adapter", "m.swappable.onnx", "m.swappable.onnx.data"]


def test_pt2_stream_refusals_are_one_line(cli, adapted, tmp_path):
    for args, words in (
        (("--dtype", "bf16"), "keeps its dtype"),
        (("--task", "feature-extraction"), "keeps its head"),
        (("--method", "lora"), "already adapted"),
        (("--swappable",), "houlsby"),  # a LoRA model has no bottleneck slots
    ):
        run = cli("export", adapted["lora"], "--stream", *args, "-o", "x.onnx", cwd=tmp_path)
        assert run.code == 2 and "Traceback" not in run.stderr, run.stderr
        assert words in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []
    with zipfile.ZipFile(adapted["lora"]) as zf:  # the archive as torch.export.save writes it: weights stored raw
        assert all(
            i.compress_type == zipfile.ZIP_STORED for i in zf.infolist() if "/data/weights/weight_" in i.filename
        )
