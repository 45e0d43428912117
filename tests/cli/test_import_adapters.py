"""`surgery import-adapters` and `surgery export-peft` as subprocesses, on the AdapterHub references.

Fast: a refused option is one line, exit 2, nothing written (before the base is captured). Slow: the saved
.adapted.pt2 reopened (its adapters inlined by torch.export, lifted again) still matches `adapters`' output, for
the Pfeiffer placement that re-applies the norm; a pack of it gives the saved tensors back; a LoRA goes on to a
PEFT folder that PEFT loads and matches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parents[1] / "data" / "adapterhub"


def _errors(run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def test_refused_option_is_one_line(tmp_path, cli):
    folder = tmp_path / "ln"
    shutil.copytree(DATA / "gpt2-pfeiffer", folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    saved["config"]["ln_after"] = True
    (folder / "adapter_config.json").write_text(json.dumps(saved))
    before = sorted(p.name for p in tmp_path.iterdir())
    run = cli("import-adapters", "ln", "--base", str(DATA / "gpt2-tiny"), "-o", "x.adapted.pt2", cwd=tmp_path)
    assert run.code == 2 and "Traceback" not in run.stderr, run.stderr
    errors = _errors(run)
    assert len(errors) == 1 and "ln_after" in errors[0], run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _parity(path: Path, case: str) -> None:
    from surgery.parity import compare
    from surgery.pipeline import open_model

    ref = load_file(str(DATA / f"{case}.ref.safetensors"))
    captured = open_model(str(path))
    assert captured.manifest is not None and captured.manifest.adapterhub.name == case
    with torch.no_grad():
        out = captured.gm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])[0]
    parity = compare([ref["last_hidden_state"]], [out], mask=ref["attention_mask"], where=f"reloaded {case}")
    assert parity.ok, parity.summary()


@pytest.mark.slow
def test_saved_pfeiffer_reopens_and_packs(tmp_path, cli):
    run = cli("import-adapters", DATA / "minilm-pfeiffer", "-o", "p.adapted.pt2", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["method"] == "pfeiffer" and run.json["forms"] == ["before_norm"] and run.json["r"] == 8
    assert len(run.json["sites"]) == 4  # leave_out [1, 4] of 6 layers
    _parity(tmp_path / "p.adapted.pt2", "minilm-pfeiffer")
    run = cli("pack", "p.adapted.pt2", "-o", "p.safetensors", cwd=tmp_path)
    assert run.code == 0, run.stderr
    pack = load_file(str(tmp_path / "p.safetensors"))
    saved = torch.load(DATA / "minilm-pfeiffer" / "pytorch_adapter.bin", weights_only=True)
    for layer in (0, 2, 3, 5):
        theirs = f"encoder.layer.{layer}.output.adapters.minilm-pfeiffer."
        ours = f"adapters.encoder.layer.{layer}.output.dense."
        assert torch.equal(pack[ours + "down_w"], saved[theirs + "adapter_down.0.weight"].T)
        assert torch.equal(pack[ours + "up_w"], saved[theirs + "adapter_up.weight"].T)
        assert torch.equal(pack[ours + "up_b"], saved[theirs + "adapter_up.bias"])


@pytest.mark.slow
def test_lora_to_peft(tmp_path, cli):
    peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
    from transformers import AutoModel

    base = DATA / "gpt2-tiny"
    run = cli("import-adapters", DATA / "gpt2-lora", "--base", base, "-o", "l.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    _parity(tmp_path / "l.adapted.pt2", "gpt2-lora")
    run = cli("export-peft", "l.adapted.pt2", "-o", "peft", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["target_modules"] == ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    ref = load_file(str(DATA / "gpt2-lora.ref.safetensors"))
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), tmp_path / "peft").eval()
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    from surgery.parity import compare

    parity = compare([ref["last_hidden_state"]], [out], mask=ref["attention_mask"], where="PEFT")
    assert parity.ok, parity.summary()
    run = cli("export-peft", "l.adapted.pt2", "-o", "peft", cwd=tmp_path)  # exists: refused, left as it was
    assert run.code == 2 and len(_errors(run)) == 1 and "not an empty folder" in _errors(run)[0]
