"""Families whose form the graph rule had to learn, each from a small config (random weights, 2 layers, width 64).

Houlsby adapters with distinct random weights are inserted by default (the graph rule finds the table's sites); the
adapted graph is checked against the Hugging Face module with the same adapters hooked on the site modules' outputs
(an independent placement), the count against the formula 2L(2dr + d + r), the baked ONNX export against torch."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.capture import Captured, capture
from surgery.graph import adapter_target
from surgery.load import load
from surgery.pipeline import adapt
from surgery.sites import RESIDUAL, graph_rule_sites, head_sites
from tests.families import FAMILIES, write_config

R = 4


def adapted_against_hooked(model_type: str, folder: Path) -> Captured:
    """Insert by default, compare with the eager module hooked at the same sites, count, export with parity."""
    from exporters.onnx import export_onnx

    loaded = load(str(write_config(model_type, folder)))
    module = loaded.module
    captured = capture(loaded)
    adapted = dataclasses.replace(captured, gm=copy.deepcopy(captured.gm))
    report = adapt(adapted, AdapterSpec("houlsby", r=R), seed=1)
    stand_in_weights(adapted.gm, seed=7)

    d, n_layers = FAMILIES[model_type]["hidden_size"], FAMILIES[model_type]["num_hidden_layers"]
    assert len(report.sites) == 2 * n_layers
    assert [(s.path, s.role) for s in graph_rule_sites(captured.gm)] == [(s.path, s.role) for s in report.sites]
    assert report.trainable == 2 * n_layers * (2 * d * R + d + R)

    hooks = [
        module.get_submodule(s.path).register_forward_hook(
            lambda m, i, out, a=adapted.gm.get_submodule(adapter_target(s)): a(out)
        )
        for s in report.sites
    ]
    examples = captured.signature.examples()
    with torch.no_grad():
        try:
            want = captured.signature.call(module, examples)
        finally:
            for h in hooks:
                h.remove()
        got = adapted.signature.call(adapted.gm, examples)
        base = captured.signature.call(captured.gm, examples)
    want, got, base = ([t for t in pytree.tree_leaves(o) if isinstance(t, torch.Tensor)] for o in (want, got, base))
    assert len(got) == len(want) == len(base)
    assert (got[0] - base[0]).abs().max() > 1e-3  # the adapters do something
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    export_onnx(adapted.gm, adapted.signature, folder / "model.onnx")  # refuses a mismatch with torch
    return captured


@pytest.mark.slow
def test_scaled_residual_gets_two_sites_per_layer_before_the_scale(tmp_path):
    """Granite: `residual + out * residual_multiplier`: the adapter follows the unscaled output."""
    adapted_against_hooked("granite", tmp_path)


@pytest.mark.slow
def test_attention_pooling_head_takes_no_adapter_by_default(tmp_path):
    """SigLIP's vision tower: an attention-pooling head after the layers, whose MLP is added to its own residual.
    Houlsby's sites are inside the Transformer layers only; the head's site is named apart."""
    captured = adapted_against_hooked("siglip_vision_model", tmp_path)
    assert [(s.path, s.role) for s in head_sites(captured.gm)] == [("head.mlp.fc2", RESIDUAL)]
    with_heads = graph_rule_sites(captured.gm, heads=True)
    assert [s.path for s in with_heads][-1] == "head.mlp.fc2" and len(with_heads) == 5


@pytest.mark.slow
def test_inspect_names_the_head_it_leaves_out(small_config, cli):
    config = small_config("siglip_vision_model")
    run = cli("inspect", config, "--json")
    assert run.code == 0, run.stderr
    assert [s["path"] for s in run.json["head_sites"]] == ["head.mlp.fc2"]
    assert len(run.json["sites"]) == 4
    run = cli("inspect", config)
    assert "left out: head.mlp.fc2" in run.stdout
