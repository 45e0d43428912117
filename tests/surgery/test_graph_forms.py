"""Families whose form the graph rule had to learn, each from a small config (random weights, 2 layers, width 64).

Houlsby adapters with distinct random weights are inserted by default (the graph rule finds the table's sites); the
adapted graph is checked against the Hugging Face module with the same adapters hooked on the site modules' outputs
(an independent placement), the count against the formula 2L(2dr + d + r), the baked ONNX export against torch."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.capture import Captured, capture
from surgery.errors import SurgeryError
from surgery.graph import adapter_target
from surgery.load import load
from surgery.pipeline import adapt
from surgery.sites import RESIDUAL, graph_rule_sites, head_sites
from tests.families import FAMILIES, write_config

R = 4


def adapted_against_hooked(model_type: str, folder: Path, per_layer: int = 2) -> Captured:
    """Insert by default, compare with the eager module hooked at the same sites, count, export with parity.
    `per_layer`: sites per layer, 2 (encoder, decoder-only) or 2 + 3 (an encoder-decoder's two stacks)."""
    from exporters.onnx import export_onnx

    loaded = load(str(write_config(model_type, folder)))
    module = loaded.module
    captured = capture(loaded)
    adapted = dataclasses.replace(captured, gm=copy.deepcopy(captured.gm))
    report = adapt(adapted, AdapterSpec("houlsby", r=R), seed=1)
    stand_in_weights(adapted.gm, seed=7)

    row = FAMILIES[model_type]
    d, n_layers = row.get("hidden_size", row.get("d_model")), row.get("num_hidden_layers", row.get("encoder_layers"))
    assert len(report.sites) == per_layer * n_layers
    assert [(s.path, s.role) for s in graph_rule_sites(captured.gm)] == [(s.path, s.role) for s in report.sites]
    assert report.trainable == per_layer * n_layers * (2 * d * R + d + R)  # 2L(2dr + d + r) for two per layer

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


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["pegasus", "marian", "mbart", "m2m_100"])
def test_encoder_decoders_capture_with_their_own_decoder_inputs(model_type, tmp_path):
    """Encoder-decoders beyond T5 and BART: decoder_input_ids built by the model's own shift from input_ids, two
    sites per encoder layer and three per decoder layer, each checked against the hooked eager model."""
    captured = adapted_against_hooked(model_type, tmp_path, per_layer=5)
    assert captured.signature.outputs == ("last_hidden_state", "encoder_last_hidden_state")


@pytest.mark.parametrize("model_type", ["led", "longt5"])
def test_encoder_decoders_that_cannot_be_captured_are_refused_by_name(model_type, tmp_path):
    """Refused at load, before any weights are made, with the reason in one line."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(SurgeryError, match=f"model type {model_type} cannot be captured: .+; capture it yourself"):
        load(str(config))


@pytest.mark.parametrize("model_type", ["mbart", "plbart"])
def test_the_wrapping_shift_is_the_models_own(model_type):
    """mBART's shift (the last non-pad token first), written so that it exports, equals the model's own."""
    import importlib

    from transformers import AutoConfig, AutoModel

    from surgery.load import shift_right

    model = AutoModel.from_config(AutoConfig.for_model(model_type, **FAMILIES["mbart"]))
    own = importlib.import_module(type(model).__module__).shift_tokens_right
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 1, 1], [13, 14, 1, 1, 1]])  # pad 1: rows of 5, 3 and 2 tokens
    assert torch.equal(shift_right(model, ids), own(ids, 1))
    assert torch.equal(shift_right(model, ids[:1]), own(ids[:1], 1).reshape(1, -1))


@torch.library.custom_op("surgerytest::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_insert_refuses_to_write_a_program_it_could_not_open(tmp_path):
    """A graph calling an operator registered only in this process (as transformers' grouped_mm kernel is): the
    adapted program is refused in one line, and nothing is left behind."""
    from surgery.bundle import save_adapted
    from surgery.errors import SurgeryError
    from surgery.pipeline import open_model
    from tests.conftest import TinyTransformer

    class WithOwnOp(TinyTransformer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.surgerytest.twice(super().forward(x))

    torch.manual_seed(0)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=256)
    program = torch.export.export(
        WithOwnOp().eval(), (torch.randn(2, 16, 32),), dynamic_shapes=({0: batch, 1: seq},), strict=False
    )
    torch.export.save(program, tmp_path / "own.pt2")
    captured = open_model(str(tmp_path / "own.pt2"), trust=True)  # this process knows the op
    spec = AdapterSpec("houlsby", r=R)
    report = adapt(captured, spec, seed=1)
    stand_in_weights(captured.gm, seed=7)
    out = tmp_path / "out" / "own.adapted.pt2"
    out.parent.mkdir()
    with pytest.raises(SurgeryError, match=r"not written: .*surgerytest\.twice.*not a registered operator") as err:
        save_adapted(out, captured, spec, report)
    assert "\n" not in str(err.value)
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_mixture_of_experts_is_captured_in_plain_ops(tmp_path):
    """Mixtral: the experts are captured with transformers' batched_mm (plain ops, the chosen experts only), so
    the adapted program saves, reopens and exports; one site after the combined experts per layer."""
    from surgery.pipeline import stand_in_adapted

    captured = adapted_against_hooked("mixtral", tmp_path)
    assert not [n for n in captured.gm.graph.nodes if "transformers" in str(n.target)]
    reopened = stand_in_adapted(captured, AdapterSpec("houlsby", r=R), tmp_path / "m.adapted.pt2", 1, 7)
    assert [s.path for s in reopened.manifest.sites][1::2] == ["layers.0.mlp", "layers.1.mlp"]


@pytest.mark.slow
def test_mixture_of_experts_with_a_shared_expert_is_one_site(tmp_path):
    """Qwen2-MoE: routed experts plus a gated shared expert, added inside the block: one site after both."""
    captured = adapted_against_hooked("qwen2_moe", tmp_path)
    assert [s.path for s in graph_rule_sites(captured.gm)][1::2] == ["layers.0.mlp", "layers.1.mlp"]
