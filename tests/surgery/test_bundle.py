"""Bundle: the adapted .pt2 runs in plain torch (no surgery import) and carries its manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.adapters import AdapterSpec, LoraSpec, StackSpec
from surgery.bundle import Manifest, read_manifest, save_adapted
from surgery.errors import SurgeryError
from surgery.pipeline import adapt, open_model

# Manifests as the previous version (1a74383) wrote them, from a 2-layer GPT-2 config (see tests/data/manifests).
OLD = Path(__file__).resolve().parents[1] / "data" / "manifests"


@pytest.mark.slow  # make test stays under 6 minutes; CI runs it in make test-slow
def test_adapted_pt2_runs_in_plain_torch_and_keeps_its_manifest(tmp_path, minilm):
    spec = AdapterSpec("houlsby", r=8, activation="gelu")
    report = adapt(minilm, spec)
    with torch.no_grad():
        for name, p in minilm.gm.named_parameters():
            if name.endswith("up_w"):
                p.normal_(0, 0.02)
    path = tmp_path / "m.adapted.pt2"
    meta = save_adapted(path, minilm, spec, report)
    assert not list(tmp_path.glob(".*partial*"))
    assert (meta.trainable, meta.total) == (78_432, report.total)
    assert meta.adapter == spec and meta.adapter.to_json() == {
        "method": "houlsby",
        "r": 8,
        "activation": "gelu",
        "targets": None,
    }
    assert meta.source.name == "minilm" and len(meta.sites) == 12

    tensors = minilm.signature.examples({"batch": 3, "seq": 40}, seed=5, pad=True)
    torch.save({"inputs": dict(zip(minilm.signature.names, tensors))}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = minilm.signature.call(minilm.gm, tensors)[0]
    script = (
        "import sys, torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'inputs.pt')!r})['inputs']\n"
        "assert 'surgery' not in sys.modules\n"
        "print(len([p for p in m.parameters() if p.requires_grad]))\n"
        f"torch.save(m(**x)[0], {str(tmp_path / 'out.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "48"  # 12 sites x (down_w, down_b, up_w, up_b), still trainable
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-5)

    reopened = open_model(str(path))
    assert reopened.manifest == meta
    assert reopened.signature == minilm.signature


@pytest.mark.parametrize("name", ["houlsby", "parallel", "lora", "lora-merged", "averaged", "stacked"])
def test_a_manifest_of_the_previous_version_reads_and_round_trips(name):
    old = json.loads((OLD / f"{name}.json").read_text())
    m = read_manifest({"surgery.json": json.dumps(old)}, f"{name}.adapted.pt2")
    assert m.source.sha256 == old["source"]["sha256"] and len(m.sites) == len(old["sites"])
    assert m.sites[0].path == old["sites"][0]["path"] and m.signature.names == [
        i["name"] for i in old["signature"]["inputs"]
    ]
    again = json.loads(json.dumps(m.to_json()))  # as written to the file
    if name == "stacked":  # a stack's adapter no longer invents r, activation and targets
        assert isinstance(m.adapter, StackSpec) and [p.r for p in m.adapter.parts] == [4, 4]
        assert {k: v for k, v in old["adapter"].items() if v is not None} == again["adapter"]
        old["adapter"] = again["adapter"]
    assert again == old
    assert Manifest.from_json(again) == m


def test_the_previous_versions_extras_become_attributes():
    read = {
        n: Manifest.from_json(json.loads((OLD / f"{n}.json").read_text()))
        for n in ("lora-merged", "averaged", "stacked", "parallel")
    }
    merged = read["lora-merged"].merged
    assert merged.kinds == ("lora",) and merged.merged == 4 and merged.unmerge_max_abs_diff < 1e-6
    assert isinstance(read["lora-merged"].adapter, LoraSpec) and read["lora-merged"].adapter.ranks == {"q": 2, "v": 4}
    assert read["averaged"].average.weights == (0.7, 0.3) and read["averaged"].stack is None
    assert [p.prefix for p in read["stacked"].stack] == ["adapters", "adapters.1"]
    assert read["parallel"].adapter.scale == 4.0 and read["parallel"].merged is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("signature"), "damaged manifest .KeyError: 'signature'"),
        (lambda d: d.update(tool="other"), "not a surgery manifest"),
        (lambda d: d.update(sites=[]), "lists no adapted sites"),
        (lambda d: d["params"].update(trainable=-1), "-1 adapter parameters"),
        (lambda d: d["adapter"].update(r=0), "--r 0: the bottleneck size must be an integer >= 1"),
        (lambda d: d["adapter"].update(method="stack", parts=[]), "a stack holds two or more"),
    ],
)
def test_a_damaged_manifest_is_refused_when_read(edit, message):
    d = json.loads((OLD / "houlsby.json").read_text())
    edit(d)
    with pytest.raises(SurgeryError, match=message):
        read_manifest({"surgery.json": json.dumps(d)}, "m.adapted.pt2")
    with pytest.raises(SurgeryError, match="m.adapted.pt2: its surgery.json is not JSON"):
        read_manifest({"surgery.json": "{"}, "m.adapted.pt2")
    assert read_manifest({"surgery.json": ""}, "plain.pt2") is None
