"""AdapterHub import (surgery/adapterhub.py) against `adapters`' own forward, on the stored references.

tests/data/adapterhub holds folders written by `adapters` 1.3's `save_adapter` (random non-zero weights) and, per
case, the inputs and `adapters`' last hidden state (make_references.py, run once in a venv with transformers 4.57).
Each case is imported into the captured base and compared with the one comparison (surgery/parity.py) over the
unpadded positions; the base model's own output is stored too, to show each adapter changes the output.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.adapterhub import import_adapterhub, read_adapterhub
from surgery.adapters import LoraSpec
from surgery.bundle import adapted_manifest
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.packs import load_pack, pack_from_model, save_pack
from surgery.parity import compare

DATA = Path(__file__).resolve().parents[1] / "data" / "adapterhub"

# case -> (method, site forms, r)
MINILM_CASES = {
    "minilm-houlsby": ("houlsby", {None}, 8),
    "minilm-pfeiffer": ("pfeiffer", {"before_norm"}, 8),
    "minilm-parallel": ("parallel", {None}, 8),
    "minilm-adapterplus": ("pfeiffer", {"after_norm"}, 4),
    "minilm-lora": ("lora", {None}, 4),
}
GPT2_CASES = {
    "gpt2-houlsby": ("houlsby", {None}, 8),
    "gpt2-pfeiffer": ("pfeiffer", {"after_add"}, 4),
    "gpt2-parallel": ("parallel", {None}, 8),
    "gpt2-adapterplus": ("pfeiffer", {"after_add"}, 8),
    "gpt2-head-safetensors": ("pfeiffer", {"after_add"}, 8),
    "gpt2-lora": ("lora", {None}, 2),
}


@pytest.fixture
def gpt2_base(adapterhub_gpt2: Captured) -> Captured:
    return adapterhub_gpt2


def _private(base: Captured) -> Captured:
    return dataclasses.replace(base, gm=copy.deepcopy(base.gm))


def _check(captured: Captured, case: str, expect: tuple[str, set, int]) -> None:
    ref = load_file(str(DATA / f"{case}.ref.safetensors"))
    spec, report, hub = import_adapterhub(captured, DATA / case)
    method, forms, r = expect
    assert spec.method == method and {s.form for s in report.sites} == forms
    assert (set(spec.ranks.values()) if isinstance(spec, LoraSpec) else {spec.r}) == {r}
    with torch.no_grad():
        out = captured.gm(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])[0]
    mask = ref["attention_mask"]
    parity = compare([ref["last_hidden_state"]], [out], mask=mask, where=case)
    assert parity.ok, parity.summary()
    base = compare([ref["base_last_hidden_state"]], [out], mask=mask)
    assert not base.ok  # the adapter changes the output: the comparison above could fail
    assert hub.skipped == (("head_config.json", "model_head.safetensors") if "head" in case else ())


@pytest.mark.parametrize("case", MINILM_CASES)
def test_minilm_matches_adapters(minilm, case):
    _check(minilm, case, MINILM_CASES[case])


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_matches_adapters(gpt2_base, case):
    _check(_private(gpt2_base), case, GPT2_CASES[case])


@pytest.mark.parametrize(("case", "base"), [("minilm-houlsby", "minilm"), ("gpt2-pfeiffer", "gpt2")])
def test_pack_gives_the_tensors_back(request, tmp_path, case, base):
    """Import, then a pack (safetensors, written and read back): the tensors `adapters` saved, transposed."""
    captured = request.getfixturevalue("minilm") if base == "minilm" else _private(request.getfixturevalue("gpt2_base"))
    spec, report, hub = import_adapterhub(captured, DATA / case)
    manifest = adapted_manifest(captured, spec, report, adapterhub=hub)
    pack = load_pack(save_pack(pack_from_model(captured.gm.state_dict(), manifest), tmp_path / "p.safetensors"))
    _, saved, _ = read_adapterhub(DATA / case)
    assert len(pack.tensors) == len(saved) == 4 * len(report.sites)
    for site in report.sites:
        at = re.compile(rf"(layer|h)\.{site.layer}\.")
        hub_keys = [k for k in saved if at.search(k) and ("attention" in k) == (site.role == "attn_out")]
        theirs = {k.rsplit(f".{hub.name}.", 1)[1]: saved[k] for k in hub_keys}
        ours = {k.rsplit(".", 1)[1]: v for k, v in pack.tensors.items() if k.startswith(f"adapters.{site.path}.")}
        torch.testing.assert_close(ours["down_w"], theirs["adapter_down.0.weight"].T, rtol=0, atol=0)
        torch.testing.assert_close(ours["down_b"], theirs["adapter_down.0.bias"], rtol=0, atol=0)
        torch.testing.assert_close(ours["up_w"], theirs["adapter_up.weight"].T, rtol=0, atol=0)
        torch.testing.assert_close(ours["up_b"], theirs["adapter_up.bias"], rtol=0, atol=0)


def _edited(tmp_path: Path, case: str, **changes) -> Path:
    folder = tmp_path / case
    shutil.copytree(DATA / case, folder)
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["config"].update(changes)
    path.write_text(json.dumps(saved))
    return folder


COMPACTER = dict(phm_layer=True, reduction_factor=32, non_linearity="gelu", mh_adapter=True, phm_dim=4)
REFUSED = [
    ("gpt2-pfeiffer", {"ln_before": True}, "ln_before"),
    ("gpt2-pfeiffer", {"ln_after": True}, "ln_after"),
    ("gpt2-pfeiffer", {"phm_layer": True}, "phm_layer"),
    ("gpt2-houlsby", COMPACTER, "Compacter"),
    ("gpt2-pfeiffer", {"architecture": "prefix_tuning", "prefix_length": 30}, "prefix_tuning"),
    ("gpt2-pfeiffer", {"use_gating": True}, "use_gating"),
    ("gpt2-pfeiffer", {"inv_adapter": "nice"}, "inv_adapter"),
    ("gpt2-pfeiffer", {"cross_adapter": True}, "cross_adapter"),
    ("gpt2-pfeiffer", {"non_linearity": "gelu_new"}, "non_linearity 'gelu_new'"),
    ("gpt2-pfeiffer", {"architecture": "reft"}, "method 'reft'"),
    ("gpt2-lora", {"use_dora": True}, "DoRA"),
    ("gpt2-lora", {"use_gating": True}, "use_gating"),
    ("gpt2-lora", {"composition_mode": "scale"}, "(IA)^3"),
    ("gpt2-lora", {"vera_d": 0.1}, "VeRA"),
]


@pytest.mark.parametrize(("case", "changes", "named"), REFUSED, ids=[r[2] for r in REFUSED])
def test_refused_by_name(tmp_path, case, changes, named):
    with pytest.raises(SurgeryError) as err:
        read_adapterhub(_edited(tmp_path, case, **changes))
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "options",
    [
        {"original_ln_before": True, "residual_before_ln": True, "original_ln_after": False},  # drops the residual
        {"original_ln_before": True, "residual_before_ln": False, "original_ln_after": True},  # adds it twice
    ],
)
def test_unexpressible_placement_refused(gpt2_base, tmp_path, options):
    with pytest.raises(SurgeryError) as err:
        import_adapterhub(_private(gpt2_base), _edited(tmp_path, "gpt2-pfeiffer", **options))
    assert "original_ln_before=True" in str(err.value) and "\n" not in str(err.value)


def test_wrong_base_refused(minilm):
    with pytest.raises(SurgeryError, match="trained on a gpt2, --base is a bert"):
        import_adapterhub(minilm, DATA / "gpt2-houlsby")


def test_bin_pickle_runs_no_code(tmp_path):
    """pytorch_adapter.bin is read with torch.load(weights_only=True): a pickle that would run code is refused."""
    from tests.security.hostile import Payload

    marker = tmp_path / "MARKER"
    folder = tmp_path / "evil"
    shutil.copytree(DATA / "gpt2-pfeiffer", folder)
    torch.save({"x": Payload(marker)}, folder / "pytorch_adapter.bin")
    with pytest.raises(SurgeryError, match="pytorch_adapter.bin: refused") as err:
        read_adapterhub(folder)
    assert "\n" not in str(err.value) and not marker.exists()
