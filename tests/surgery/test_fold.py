"""The down-projection fold: exact against the unfolded adapted model, saved and reloaded, and only where exact."""

from __future__ import annotations

import pytest
import torch

from surgery.capture import export_program
from surgery.fold import FoldedBottleneck, folded_copy
from surgery.pipeline import open_model
from tests.conftest import make_adapted


def _outputs(captured, gm):
    tensors = captured.signature.examples({"batch": 3, "seq": 21}, seed=4, pad=True)
    with torch.no_grad():
        return captured.signature.call(gm, tensors)


def _check_folded(adapted, tmp_path, projection: str, wide_dim: int) -> None:
    """Every bottleneck folded, the projection's weight r = 4 wider, and the folded model computes what the
    reloaded, unfolded model computes, before and after save and reload (the original model untouched)."""
    before = adapted.gm.get_parameter(projection).clone()
    gm = folded_copy(adapted.gm, adapted.manifest)
    assert gm is not None
    assert sum(isinstance(m, FoldedBottleneck) for m in gm.modules()) == len(adapted.manifest.sites)
    assert gm.get_parameter(projection).shape[wide_dim] == before.shape[wide_dim] + 4
    assert torch.equal(adapted.gm.get_parameter(projection), before)
    reference = _outputs(adapted, adapted.gm)
    for want, got in zip(reference, _outputs(adapted, gm)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.export.save(export_program(gm, adapted.signature, "folded form"), tmp_path / "f.pt2")
    for want, got in zip(reference, _outputs(adapted, torch.export.load(tmp_path / "f.pt2").module())):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_gpt2_conv1d_folds(tmp_path, small_config):
    """Conv1D is `addmm(bias, a, W)` with W (in, d): W becomes [W | W W_down], (in, d + r)."""
    adapted = make_adapted(open_model(str(small_config("gpt2"))), tmp_path, 4)
    _check_folded(adapted, tmp_path, "h.0.attn.c_proj.weight", 1)


@pytest.mark.slow
def test_bert_linear_folds(tmp_path, minilm_base):
    """nn.Linear is `linear(a, W, b)` with W (d, in): W gains r rows, W_down^T W."""
    adapted = make_adapted(minilm_base, tmp_path, 4)
    _check_folded(adapted, tmp_path, "encoder.layer.0.attention.output.dense.weight", 0)


@pytest.mark.slow
def test_projections_without_bias_are_left_unfolded(tmp_path, small_config):
    adapted = make_adapted(open_model(str(small_config("llama"))), tmp_path, 4)  # o_proj, down_proj: no bias
    assert folded_copy(adapted.gm, adapted.manifest) is None
