"""The one comparison: per output, over unpadded positions, max|a - ref| <= atol + rtol * max|ref|, or, where that
fails, within NOISE_K times torch's own noise on the same inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from exporters.onnx import export_onnx
from exporters.verify import check_session
from runtime.session import ort_session
from surgery.adapters import stand_in_weights
from surgery.parity import NOISE_K, Parity, compare, outputs_of, own_noise


def test_relative_part_scales_with_the_largest_reference_magnitude():
    ref = np.array([[100.0, -110.0, 3.0]])
    got = ref + 1.6e-3  # Qwen2.5-0.5B's base export: 1.6e-3 on outputs of magnitude ~110
    p = compare([ref], [got], atol=1e-4, rtol=1e-4, names=["h"])
    d = p.outputs["h"]
    assert d.max_abs == pytest.approx(1.6e-3, rel=1e-3) and d.ref_max == pytest.approx(110.0)
    assert d.rel == pytest.approx(1.6e-3 / 110.0, rel=1e-3)
    assert p.ok  # 1.6e-3 <= 1e-4 + 1e-4 * 110
    assert not compare([ref], [got], atol=1e-4, rtol=0.0).ok  # the absolute tolerance alone refuses it
    assert not compare([ref], [ref * 1.001], atol=1e-4, rtol=1e-4).ok  # 0.11 > 0.0111


def test_each_output_is_held_to_its_own_scale():
    big, small = np.full((2, 3), 100.0), np.full((2, 3), 0.01)
    p = compare([big, small], [big + 5e-3, small + 5e-3], atol=1e-4, rtol=1e-4, names=["big", "small"])
    assert p.outputs["big"].ok and not p.outputs["small"].ok and not p.ok
    assert p.worst.startswith("output small")
    assert set(p.to_json()["per_output"]) == {"big", "small"}
    assert "small 0.005 abs, 0.5 rel" in p.summary()


def test_padded_positions_are_left_out_and_shapes_must_match():
    ref = torch.zeros(2, 4, 3)
    got = ref.clone()
    got[1, 3] = 7.0  # garbage at a padded position
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert compare([ref], [got.numpy()], mask=mask).ok
    assert not compare([ref], [got.numpy()]).ok
    wrong = compare([ref], [np.zeros((2, 4))])
    assert not wrong.ok and wrong.max_abs_diff == float("inf")
    assert not compare([ref, ref], [ref]).ok  # an output missing


def test_nan_fails():
    ref = np.ones(4)
    assert not compare([ref], [np.array([1.0, np.nan, 1.0, 1.0])]).ok


def test_combine_keeps_the_worst_of_each_output():
    a = compare([np.ones(3)], [np.ones(3) + 1e-5], names=["x"], where="shape A")
    b = compare([np.ones(3) * 50], [np.ones(3) * 50 + 1e-3], names=["x"], where="shape B")
    both = Parity(a.atol, a.rtol, a.outputs, [{"batch": 1}], a.worst).combine(
        Parity(b.atol, b.rtol, b.outputs, [{"batch": 2}], b.worst)
    )
    x = both.outputs["x"]
    assert x.max_abs == pytest.approx(1e-3, rel=1e-6) and x.ref_max == 50 and x.rel == pytest.approx(2e-5, rel=1e-6)
    assert both.shapes == [{"batch": 1}, {"batch": 2}]
    assert both.worst == "output x, shape B"  # 1e-3 of an allowance of 5.1e-3 against 1e-5 of 2e-4


def test_torch_noise_as_the_floor_passes_rounding_and_reports_both_figures():
    ref = np.linspace(-50.0, 50.0, 12).reshape(3, 4)
    got = ref + 6e-3  # past atol + rtol * 50 = 5.1e-3
    own = ref + 1e-3  # torch disagreeing with itself by 1e-3
    fixed = compare([ref], [got], names=["logits"])
    assert not fixed.ok and "torch's own" not in fixed.summary()
    p = compare([ref], [got], names=["logits"], noise=[own], how="torch fp32 against float64")
    assert p.ok and p.outputs["logits"].floor == pytest.approx(1e-3)
    assert p.outputs["logits"].allowed(p.atol, p.rtol) == pytest.approx(1e-4 + NOISE_K * 1e-3)
    assert "torch's own 0.001" in p.summary() and "torch fp32 against float64" in p.summary()
    assert p.to_json()["per_output"]["logits"]["torch_noise_abs"] == pytest.approx(1e-3)
    wrong = compare([ref], [ref * 1.01], names=["logits"], noise=[own], how="threads")  # 0.5 abs: 50 floors
    assert not wrong.ok and "torch's own 0.001" in wrong.summary()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: the LM head tied to the embedding
def test_own_noise_runs_the_graph_in_float64_and_leaves_the_module_as_it_was(lm_base, family):
    captured = lm_base(family)
    sig = captured.signature
    tensors = sig.examples({"batch": 2, "seq": 9, "past": 3}, seed=3, pad=True)
    before = outputs_of(captured.gm, sig, tensors)
    noise, how = own_noise(captured.gm, sig, tensors)
    assert how == "torch fp32 against float64"
    assert all(t.dtype == torch.float64 for t in noise if t.is_floating_point())
    floors = [float((n - b.double()).abs().max()) for n, b in zip(noise, before)]
    scales = [float(b.abs().max()) for b in before]
    assert max(floors) > 0 and all(f <= 1e-5 * s for f, s in zip(floors, scales))  # fp32 rounding, not another model
    after = outputs_of(captured.gm, sig, tensors)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the fp32 module was not converted
    assert all(p.dtype == torch.float32 for p in captured.gm.parameters())


def test_check_passes_an_onnx_export_within_torch_noise_and_refuses_a_weight_scaled_by_1_01(lm_base, tmp_path):
    """With no fixed allowance at all (atol = rtol = 0), what passes is ONNX Runtime's fp32 rounding measured against
    torch's own; the same base matrix scaled by 1.01 in the reference is hundreds of floors away."""
    captured = copy.deepcopy(lm_base("llama"))
    stand_in_weights(captured.gm, seed=5)
    path = tmp_path / "lm.onnx"
    export_onnx(captured.gm, captured.signature, path)
    session = ort_session(path)
    strict = check_session(session, captured.gm, captured.signature, tolerance=0.0, rtol=0.0)
    assert strict.ok and strict.noise == "torch fp32 against float64", strict.summary()
    assert any(d.floor for d in strict.outputs.values()) and strict.max_abs_diff > 0
    weight = captured.gm.get_parameter("model.layers.0.mlp.down_proj.weight")
    with torch.no_grad():
        weight.mul_(1.01)
    bad = check_session(session, captured.gm, captured.signature, tolerance=0.0, rtol=0.0)
    assert not bad.ok and "torch's own" in bad.summary()
    bad = check_session(session, captured.gm, captured.signature)  # the defaults: fixed rule, then the floor
    assert not bad.ok and "torch fp32 against float64" in bad.summary()
