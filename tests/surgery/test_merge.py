"""Merge passes on the pretrained MiniLM and small GPT-2/Llama: exact folds, unmerge, stack, average, refusals."""

from __future__ import annotations

import copy
import dataclasses

import onnx
import pytest
import torch

from exporters.onnx import export_onnx
from surgery.adapters import AdapterSpec, LoraSpec, stand_in_weights
from surgery.bundle import Manifest, save_adapted
from surgery.errors import SurgeryError
from surgery.graph import adapter_nodes, lift_adapters
from surgery.merge import average_adapters, merge_adapters, stack_adapters, unmerge_lora
from surgery.pipeline import adapt, check_same_base, merge_model, open_model
from surgery.sites import Site

ATOL = 1e-5  # fp32: merged against unmerged
SITE = Site("encoder.layer.0.output.dense", 0, "ffn_out", 384, "linear_5")


def _copy(base):
    return dataclasses.replace(base, gm=copy.deepcopy(base.gm))


def _outputs(captured):
    tensors = captured.signature.examples({"batch": 3, "seq": 24}, seed=2, pad=True)
    with torch.no_grad():
        return captured.signature.call(captured.gm, tensors)[0]


def _nodes(gm):
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def _adapted(base, spec, seed=1):
    captured = _copy(base)
    report = adapt(captured, spec)
    stand_in_weights(captured.gm, seed)
    return captured, report


@pytest.fixture(scope="module")
def gpt2_base(small_config):
    return open_model(str(small_config("gpt2")))


@pytest.fixture(scope="module")
def llama_base(small_config):
    return open_model(str(small_config("llama")))


def _base(request, which):
    return request.getfixturevalue({"minilm": "minilm_base", "gpt2": "gpt2_base", "llama": "llama_base"}[which])


LORAS = [LoraSpec({"q": 8, "v": 8}), LoraSpec({"q": 2, "k": 2, "v": 2, "o": 2, "ffn_in": 4, "ffn_out": 4}, alpha=16)]


@pytest.mark.parametrize("which", ["minilm", "gpt2", "llama"])
@pytest.mark.parametrize("spec", LORAS, ids=["qv8", "all-projections"])
def test_lora_merge_is_exact_gives_the_base_graph_and_unmerges(request, which, spec):
    base = _base(request, which)
    captured, report = _adapted(base, spec)
    adapted = _outputs(captured)
    original = {n: p.detach().clone() for n, p in captured.gm.named_parameters() if not n.startswith("adapters.")}
    loras = {str(n.target): copy.deepcopy(captured.gm.get_submodule(str(n.target))) for n in adapter_nodes(captured.gm)}

    merged = merge_adapters(captured.gm)
    assert set(merged.merged.values()) == {"lora"} and len(merged.merged) == len(report.sites)
    assert _nodes(captured.gm) == _nodes(base.gm)  # node for node the base graph
    assert not any(n.startswith("adapters.") for n, _ in captured.gm.named_parameters())
    torch.testing.assert_close(_outputs(captured), adapted, rtol=0, atol=ATOL)
    assert not torch.allclose(_outputs(captured), _outputs(base), atol=1e-3)  # the merge did change the weights

    unmerge_lora(captured.gm, loras, report.sites)
    restored = max(float((captured.gm.get_parameter(n) - w).abs().max()) for n, w in original.items())
    assert restored < 1e-6, restored  # measured: 0 to a few ulp of the weights
    torch.testing.assert_close(_outputs(captured), adapted, rtol=0, atol=ATOL)


def test_merge_model_measures_its_own_exactness(minilm_base):
    captured, report = _adapted(minilm_base, LoraSpec({"q": 8, "v": 8}, alpha=16))
    result, loras = merge_model(captured, report.sites)
    assert len(loras) == 12 and result.output_max_abs_diff < ATOL
    assert result.unmerge_max_abs_diff is not None and result.unmerge_max_abs_diff < 1e-6


@pytest.mark.parametrize("which", ["minilm", "gpt2", "llama"])
def test_linear_bottleneck_folds_into_the_projection_exactly(request, which):
    base = _base(request, which)
    captured, _ = _adapted(base, AdapterSpec("houlsby", r=8, activation="identity"))
    adapted = _outputs(captured)
    merge_adapters(captured.gm)
    torch.testing.assert_close(_outputs(captured), adapted, rtol=0, atol=ATOL)
    extra = len(captured.gm.graph.nodes) - len(base.gm.graph.nodes)
    assert extra == (0 if which != "llama" else 4)  # Llama's o_proj/down_proj have no bias: one get_attr each


@pytest.mark.parametrize(
    "spec, message",
    [
        (AdapterSpec("houlsby", r=8, activation="relu"), "nonlinear"),
        (AdapterSpec("parallel", r=8, activation="identity", scale=2.0), "parallel adapter"),
    ],
)
def test_merging_a_nonlinear_adapter_is_refused_and_changes_nothing(minilm_base, spec, message):
    captured, _ = _adapted(minilm_base, spec)
    before = _outputs(captured)
    with pytest.raises(SurgeryError, match=message) as info:
        merge_adapters(captured.gm)
    assert "--stack" in str(info.value)
    assert torch.equal(_outputs(captured), before)


def test_merge_of_a_reloaded_pt2_lifts_its_adapters_first(tmp_path, gpt2_base):
    spec = LoraSpec({"q": 4, "v": 4}, alpha=8)
    captured, report = _adapted(gpt2_base, spec)
    save_adapted(tmp_path / "m.adapted.pt2", captured, spec, report)
    adapted = _outputs(captured)
    reopened = open_model(str(tmp_path / "m.adapted.pt2"))
    lift_adapters(reopened.gm, spec, report.sites)
    assert len(adapter_nodes(reopened.gm)) == 4
    torch.testing.assert_close(_outputs(reopened), adapted, rtol=0, atol=0)
    merge_adapters(reopened.gm)
    assert len(reopened.gm.graph.nodes) == len(gpt2_base.gm.graph.nodes)
    torch.testing.assert_close(_outputs(reopened), adapted, rtol=0, atol=ATOL)


@pytest.mark.slow  # three ONNX exports of MiniLM
def test_merged_lora_onnx_has_the_base_node_count(tmp_path, minilm_base):
    captured, _ = _adapted(minilm_base, LoraSpec({"q": 8, "v": 8}))
    unmerged = export_onnx(captured.gm, captured.signature, tmp_path / "lora.onnx")
    merge_adapters(captured.gm)
    merged = export_onnx(captured.gm, captured.signature, tmp_path / "merged.onnx")
    base = export_onnx(minilm_base.gm, minilm_base.signature, tmp_path / "base.onnx")
    count = {r.path.stem: len(onnx.load(str(r.path)).graph.node) for r in (unmerged, merged, base)}
    assert count["merged"] == count["base"] < count["lora"], count
    assert merged.parity.max_abs_diff < 1e-4


def _insert_sequence(base, first, second, sites):
    """Reference for --stack, built by hand: nn.Sequential(first's adapter, second's) after every site."""
    captured = _copy(base)
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    for i, site in enumerate(sites):
        target = f"reference_{i}"
        module = torch.nn.Sequential(
            first.gm.get_submodule(f"adapters.{site.path}"), second.gm.get_submodule(f"adapters.{site.path}")
        )
        captured.gm.add_module(target, module)
        y = nodes[site.node]
        with captured.gm.graph.inserting_after(y):
            new = captured.gm.graph.call_module(target, (y,))
        y.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    captured.gm.recompile()
    return captured


def test_stack_runs_the_adapters_in_sequence(minilm_base):
    a, report = _adapted(minilm_base, AdapterSpec("houlsby", r=8), seed=1)
    b, _ = _adapted(minilm_base, AdapterSpec("houlsby", r=4, activation="gelu"), seed=2)
    expected = _outputs(_insert_sequence(minilm_base, a, b, report.sites))
    only_a = _outputs(a)
    stacked = _copy(a)
    stack_adapters(stacked.gm, b.gm, report.sites, prefix="adapters.1")
    assert len(adapter_nodes(stacked.gm)) == 24
    assert "adapters.1.encoder.layer.0.output.dense.down_w" in dict(stacked.gm.named_parameters())
    torch.testing.assert_close(_outputs(stacked), expected, rtol=0, atol=1e-6)
    assert (_outputs(stacked) - only_a).abs().max() > 1e-3


def test_stacked_loras_add_their_deltas(gpt2_base):
    a, report_a = _adapted(gpt2_base, LoraSpec({"q": 4, "v": 4}), seed=1)
    b, report_b = _adapted(gpt2_base, LoraSpec({"v": 2, "o": 2}), seed=2)
    stacked = _copy(a)
    stack_adapters(stacked.gm, b.gm, report_b.sites, prefix="adapters.1")
    out = _outputs(stacked)
    merge_adapters(a.gm)
    merge_adapters(b.gm)
    both = _copy(gpt2_base)  # W + dA + dB, by hand
    with torch.no_grad():
        for name, w in both.gm.named_parameters():
            w += (a.gm.get_parameter(name) - w) + (b.gm.get_parameter(name) - w)
    torch.testing.assert_close(out, _outputs(both), rtol=0, atol=ATOL)


def test_lora_average_is_the_weighted_sum_of_deltas(minilm_base):
    a, _ = _adapted(minilm_base, LoraSpec({"q": 8, "v": 8}, alpha=16), seed=1)
    b, _ = _adapted(minilm_base, LoraSpec({"q": 8, "v": 8}, alpha=8), seed=2)
    targets = [str(n.target) for n in adapter_nodes(a.gm)]
    deltas = {
        t: 0.7 * a.gm.get_submodule(t).delta_weight() + 0.3 * b.gm.get_submodule(t).delta_weight() for t in targets
    }
    avg = _copy(a)
    average_adapters(avg.gm, [b.gm], [0.7, 0.3])
    for t in targets:
        lora = avg.gm.get_submodule(t)
        assert lora.lora_A.shape[1] == 16 and lora.scale == 1.0
        torch.testing.assert_close(lora.delta_weight(), deltas[t], rtol=0, atol=1e-6)
    out = _outputs(avg)
    merge_adapters(avg.gm)  # the averaged model is the base with W + Σ w_i ΔW_i
    torch.testing.assert_close(_outputs(avg), out, rtol=0, atol=ATOL)


def test_bottleneck_average_averages_parameters(minilm_base):
    a, _ = _adapted(minilm_base, AdapterSpec("houlsby", r=8), seed=1)
    b, _ = _adapted(minilm_base, AdapterSpec("houlsby", r=8), seed=2)
    avg = _copy(a)
    average_adapters(avg.gm, [b.gm], [0.5, 0.5])
    for name, p in avg.gm.named_parameters():
        if name.startswith("adapters."):
            torch.testing.assert_close(p, 0.5 * a.gm.get_parameter(name) + 0.5 * b.gm.get_parameter(name))


@pytest.mark.parametrize(
    "second, message",
    [
        (LoraSpec({"q": 4, "v": 4}), "same method and shapes"),  # other ranks
        (AdapterSpec("houlsby", r=8), "other sites"),  # other method
    ],
)
def test_averaging_different_shapes_or_methods_is_refused(minilm_base, second, message):
    a, _ = _adapted(minilm_base, LoraSpec({"q": 8, "v": 8}), seed=1)
    b, _ = _adapted(minilm_base, second, seed=2)
    with pytest.raises(SurgeryError, match=message):
        average_adapters(a.gm, [b.gm], [0.5, 0.5])


def test_stacking_models_of_different_bases_is_refused(minilm_base, gpt2_base):
    manifests = [Manifest(c.source, AdapterSpec(), (SITE,), 0, 1, c.signature) for c in (minilm_base, gpt2_base)]
    with pytest.raises(SurgeryError, match="different base models"):
        check_same_base(manifests, ["a.adapted.pt2", "b.adapted.pt2"])


def test_unmerge_of_a_model_that_is_not_merged_is_refused(tmp_path, gpt2_base):
    from surgery.pipeline import unmerge_model

    spec = LoraSpec({"q": 4})
    captured, report = _adapted(gpt2_base, spec)
    save_adapted(tmp_path / "m.adapted.pt2", captured, spec, report)
    with pytest.raises(SurgeryError, match="not a merged model"):
        unmerge_model(str(tmp_path / "m.adapted.pt2"))


def test_averaging_parallel_adapters_of_different_scales_is_refused(gpt2_base):
    a, _ = _adapted(gpt2_base, AdapterSpec("parallel", r=4, scale=4.0), seed=1)
    b, _ = _adapted(gpt2_base, AdapterSpec("parallel", r=4, scale=1.0), seed=2)
    before = {n: p.detach().clone() for n, p in a.gm.named_parameters()}
    with pytest.raises(SurgeryError, match="has scale 4 in model 1 and 1 in model 2"):
        average_adapters(a.gm, [b.gm], [0.5, 0.5])
    assert all(torch.equal(p, before[n]) for n, p in a.gm.named_parameters())
    same, _ = _adapted(gpt2_base, AdapterSpec("parallel", r=4, scale=4.0), seed=3)
    average_adapters(a.gm, [same.gm], [0.5, 0.5])  # one scale: averaged


def _two_outputs(group, gm):
    """An edit: one more node of the adapter's group is used outside it."""
    inner = group[1]
    with gm.graph.inserting_after(inner):
        extra = gm.graph.call_function(torch.ops.aten.neg.default, (inner,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], extra),) if isinstance(out.args[0], (tuple, list)) else ((out.args[0], extra),)


def _two_inputs(group, gm):
    """An edit: the adapter's down-projection reads another node than the site's output."""
    other = next(n for n in gm.graph.nodes if n.op == "placeholder")
    first = group[0]
    first.args = (other, *first.args[1:])


@pytest.mark.parametrize(
    "edit, message", [(_two_outputs, "2 of its nodes feed the rest"), (_two_inputs, "takes 2 inputs")]
)
def test_lifting_an_edited_adapter_is_refused_before_any_change(tmp_path, gpt2_base, edit, message):
    from surgery.sites import module_path

    spec = AdapterSpec("houlsby", r=4)
    captured, report = _adapted(gpt2_base, spec)
    save_adapted(tmp_path / "m.adapted.pt2", captured, spec, report)
    reopened = open_model(str(tmp_path / "m.adapted.pt2"))
    target = f"adapters.{report.sites[-1].path}"
    edit([n for n in reopened.gm.graph.nodes if n.op == "call_function" and module_path(n) == target], reopened.gm)
    before = _nodes(reopened.gm)
    with pytest.raises(SurgeryError, match=f"adapter {target}: {message}"):
        lift_adapters(reopened.gm, spec, report.sites)
    assert _nodes(reopened.gm) == before and not adapter_nodes(reopened.gm)  # no site lifted, not even the first


def test_a_bottleneck_after_a_projection_without_a_bias_tensor_is_refused_before_any_change():
    """A projection `view(addmm(c, x, W))` whose bias c is a constant (not a tensor) cannot take the folded bias."""
    from torch import fx, nn

    from surgery.adapters import Bottleneck

    root = nn.Module()
    root.proj = nn.Module()
    root.proj.weight = nn.Parameter(torch.randn(8, 8), requires_grad=False)
    root.adapters = nn.Module()
    root.adapters.proj = Bottleneck(8, 2, "identity")
    stand_in_weights(root, seed=3)
    g = fx.Graph()
    x = g.placeholder("x")
    mm = g.call_function(torch.ops.aten.addmm.default, (0.0, x, g.get_attr("proj.weight")))
    y = g.call_function(torch.ops.aten.view.default, (mm, [-1, 8]))
    g.output(g.call_module("adapters.proj", (y,)))
    gm = fx.GraphModule(root, g)
    weight, before = gm.get_parameter("proj.weight").detach().clone(), _nodes(gm)
    with pytest.raises(SurgeryError, match="has no bias tensor to take the bottleneck's bias"):
        merge_adapters(gm)
    assert torch.equal(gm.get_parameter("proj.weight"), weight) and _nodes(gm) == before
    assert not hasattr(gm.proj, "bias")
