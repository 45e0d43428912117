"""Bundle: the adapted .pt2 runs in plain torch (no surgery import) and carries its manifest."""

from __future__ import annotations

import subprocess
import sys

import torch

from surgery.adapters import AdapterSpec
from surgery.bundle import save_adapted
from surgery.pipeline import adapt, open_model


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
    assert meta["params"] == {"trainable": 78_432, "total": report.total}
    assert meta["adapter"] == {"method": "houlsby", "r": 8, "activation": "gelu", "targets": None}
    assert meta["source"]["name"] == "minilm" and len(meta["sites"]) == 12

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
