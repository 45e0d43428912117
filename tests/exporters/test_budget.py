"""The in-memory export's estimate (exporters/budget.py): the weights' bytes of a folder and of a .pt2, the budget from
$SURGERY_MEMORY_BUDGET or the machine, and the refusal of a budget that is not a size."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from exporters.budget import BUDGET_ENV, IN_MEMORY_FACTOR, budget, estimate, weight_bytes
from surgery.errors import SurgeryError


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    save_file({"a": torch.zeros(100, 10, dtype=torch.bfloat16), "b": torch.zeros(50, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    return tmp_path


def test_a_folders_weights_scale_to_the_dtype_asked(folder):
    stored = (folder / "model.safetensors").stat().st_size
    assert weight_bytes(str(folder)) == stored
    assert weight_bytes(str(folder), "fp32") == 2 * stored
    assert weight_bytes(str(folder), "bf16") == stored


def test_a_pt2s_weights_are_its_weight_records(tmp_path):
    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data/weights/weight_0", b"\0" * 1000)
        zf.writestr("m/data/weights/weight_1", b"\0" * 24)
        zf.writestr("m/data/constants/tensor_0", b"\0" * 5000)  # not a weight
        zf.writestr("m/models/model.json", b"{}")
    assert weight_bytes(str(path)) == 1024


def test_no_estimate_for_what_the_streamed_path_cannot_read(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a folder without safetensors weights
    assert weight_bytes(str(tmp_path)) is None
    (tmp_path / "model.pt").write_bytes(b"not a zip")
    assert weight_bytes(str(tmp_path / "model.pt")) is None


@pytest.mark.parametrize("value, want", [("1000", 1000), ("800M", 800 << 20), ("12G", 12 << 30), ("1.5g", 3 << 29)])
def test_the_budget_from_the_environment(monkeypatch, value, want):
    monkeypatch.setenv(BUDGET_ENV, value)
    assert budget() == (want, f"${BUDGET_ENV} allows")


def test_the_budget_of_the_machine_is_its_available_memory(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    room = budget()
    assert room is not None and room[1] == "available" and room[0] > 0


def test_a_budget_that_is_not_a_size_is_refused(monkeypatch, folder):
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(SurgeryError, match=r"SURGERY_MEMORY_BUDGET='lots': give the bytes .* e\.g\."):
        estimate(str(folder))


def test_the_estimate_switches_where_the_weights_times_the_factor_exceed_the_budget(monkeypatch, folder):
    weights = weight_bytes(str(folder))
    assert weights is not None
    monkeypatch.setenv(BUDGET_ENV, str(int(weights * IN_MEMORY_FACTOR)))
    fit = estimate(str(folder))
    assert fit is not None and fit.fits
    monkeypatch.setenv(BUDGET_ENV, str(int(weights * IN_MEMORY_FACTOR) - 1))
    fit = estimate(str(folder))
    assert fit is not None and not fit.fits
    assert "streaming it instead" in fit.line() and "\n" not in fit.line()
