"""The one comparison: per output, over unpadded positions, max|a - ref| <= atol + rtol * max|ref|."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.parity import Parity, compare


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
