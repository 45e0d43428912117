"""benchmarks/parity_noise: the figures behind NOISE_K (difference in floors) and the matrices it corrupts."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.parity_noise import corrupted, k_needed
from surgery.parity import compare


def test_k_needed_is_the_worst_difference_in_floors_past_atol():
    ref = np.zeros((2, 3))
    p = compare([ref, ref], [ref + 3e-3, ref + 5e-5], names=["a", "b"], noise=[ref + 1e-3, ref + 1e-6])
    assert abs(k_needed(p) - 3.0) < 1e-9  # "b" is within atol: left out
    assert k_needed(compare([ref], [ref + 1e-3], noise=[ref])) == float("inf")  # no floor at all


@pytest.mark.slow  # a Gemma 3 capture
def test_corruptions_skip_projections_a_norm_makes_scale_invariant(lm_base):
    names = corrupted(lm_base("gemma").gm)  # Gemma 3: q_norm and k_norm after q_proj and k_proj
    assert len(names) == 3 and not any("q_proj" in n or "k_proj" in n for n in names)
    assert any(n.startswith("model.layers.0.") for n in names)
