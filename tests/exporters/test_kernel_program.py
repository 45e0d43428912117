"""`export --fused-pt2`: the one-op-per-bottleneck program is checked against the adapted model before it is written."""

from __future__ import annotations

import pytest

from exporters.kernel_program import export_kernel_program
from surgery.errors import SurgeryError
from surgery.pipeline import open_model
from tests.conftest import make_adapted


@pytest.mark.slow  # 10-12 s of export and reload: make test-slow (make test keeps under 6 minutes)
def test_trained_adapters_match_and_a_zero_tolerance_writes_nothing(tmp_path, small_config, monkeypatch):
    adapted = make_adapted(open_model(str(small_config("gpt2"))), tmp_path, 4)  # stand-in weights, not identity
    result = export_kernel_program(adapted, tmp_path / "g.fused.pt2")
    assert result.kernels == 4 and result.path.is_file()
    assert 0 < result.parity.max_abs_diff < 1e-5  # the up-bias fold reorders float sums: close, not bit-equal
    monkeypatch.setattr("surgery.parity.NOISE_K", 0.0)  # no allowance at all: the fold's reordered sums fail
    with pytest.raises(SurgeryError, match="differs from the adapted model"):
        export_kernel_program(adapted, tmp_path / "z.fused.pt2", tolerance=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir() if "fused" in p.name) == ["g.fused.pt2"]
