"""LoRA and the parallel adapter: their math, identity at insertion on MiniLM and GPT-2, fused slices, specs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from surgery.adapters import AdapterSpec, LoRA, LoraSpec, Parallel, parse_spec, stand_in_weights
from surgery.errors import SurgeryError
from surgery.pipeline import adapt, open_model


def _outputs(captured, seed=0):
    tensors = captured.signature.examples({"batch": 3, "seq": 24}, seed=seed, pad=True)
    with torch.no_grad():
        return captured.signature.call(captured.gm, tensors)[0]


@pytest.fixture(scope="module")
def gpt2_base(small_config):
    return open_model(str(small_config("gpt2")))


def _copy(base):
    return dataclasses.replace(base, gm=copy.deepcopy(base.gm))


CASES = [
    ("lora q,v r=8", LoraSpec({"q": 8, "v": 8}), 2),
    ("lora q,k,v,o r=2 alpha 16", LoraSpec({"q": 2, "k": 2, "v": 2, "o": 2}, alpha=16), 4),
    ("lora ffn", LoraSpec({"ffn_in": 4, "ffn_out": 4}), 2),
    ("parallel r=16 s=4", AdapterSpec("parallel", r=16, scale=4.0), 1),
    ("parallel attn,ffn", AdapterSpec("parallel", r=8, activation="gelu", scale=2.0, targets="attn,ffn"), 2),
]


@pytest.mark.parametrize("which", ["minilm", "gpt2"])
@pytest.mark.parametrize("spec, per_layer", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_identity_at_insertion_then_the_adapter_acts(minilm_base, gpt2_base, which, spec, per_layer):
    base = minilm_base if which == "minilm" else gpt2_base
    captured = _copy(base)
    report = adapt(captured, spec)
    captured.gm.graph.lint()
    layers = 6 if which == "minilm" else 2
    assert len(report.sites) == per_layer * layers
    before = _outputs(base)
    assert torch.equal(_outputs(captured), before)
    stand_in_weights(captured.gm, seed=1)
    assert (_outputs(captured) - before).abs().max() > 1e-3
    assert {n for n, p in captured.gm.named_parameters() if p.requires_grad} == {
        n for n, _ in captured.gm.named_parameters() if n.startswith("adapters.")
    }


def test_lora_math_is_y_plus_scaled_xab():
    torch.manual_seed(0)
    lora = LoRA(16, 8, r=4, alpha=16)
    with torch.no_grad():
        lora.lora_B.normal_()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    torch.testing.assert_close(lora(x, y), y + (16 / 4) * (x @ lora.lora_A @ lora.lora_B))
    torch.testing.assert_close(x @ lora.delta_weight(), (16 / 4) * x @ lora.lora_A @ lora.lora_B)


def test_lora_on_a_fused_slice_touches_only_its_columns():
    torch.manual_seed(0)
    lora = LoRA(16, 8, r=2, alpha=2, out_features=24, start=8)  # the k of a fused q,k,v of width 8 each
    with torch.no_grad():
        lora.lora_B.normal_()
    x, y = torch.randn(3, 16), torch.randn(3, 24)
    out = lora(x, y)
    assert torch.equal(out[:, :8], y[:, :8]) and torch.equal(out[:, 16:], y[:, 16:])
    torch.testing.assert_close(out[:, 8:16], y[:, 8:16] + x @ lora.lora_A @ lora.lora_B)


def test_parallel_math():
    torch.manual_seed(0)
    p = Parallel(16, 4, "relu", scale=4.0)
    with torch.no_grad():
        p.up_w.normal_()
        p.up_b.normal_()
    x, y = torch.randn(2, 16), torch.randn(2, 16)
    torch.testing.assert_close(p(x, y), y + 4.0 * (torch.relu(x @ p.down_w + p.down_b) @ p.up_w + p.up_b))


def test_gpt2_lora_takes_the_q_and_v_slices_of_c_attn(gpt2_base):
    captured = _copy(gpt2_base)
    report = adapt(captured, LoraSpec({"q": 8, "v": 8}))
    assert [(s.path, s.role, s.part, s.width, s.d_in) for s in report.sites[:2]] == [
        ("h.0.attn.c_attn", "q", (0, 3), 64, 64),
        ("h.0.attn.c_attn", "v", (2, 3), 64, 64),
    ]
    assert report.trainable == 2 * 2 * 8 * (64 + 64)
    lora_v = captured.gm.get_submodule("adapters.h.0.attn.c_attn.v")
    assert (lora_v.start, lora_v.out_features) == (128, 192)


def test_lora_adapted_model_saves_and_reloads(tmp_path, gpt2_base):
    from surgery.bundle import save_adapted

    captured = _copy(gpt2_base)
    spec = LoraSpec({"q": 4, "v": 4}, alpha=8)
    report = adapt(captured, spec)
    stand_in_weights(captured.gm, seed=1)
    meta = save_adapted(tmp_path / "m.adapted.pt2", captured, spec, report).to_json()
    assert meta["adapter"] == {
        "method": "lora",
        "r": {"q": 4, "v": 4},
        "alpha": 8,
        "targets": ["q", "v"],
        "activation": None,
    }
    assert meta["sites"][0]["part"] == [0, 3] or meta["sites"][0]["part"] == (0, 3)
    reopened = open_model(str(tmp_path / "m.adapted.pt2"))
    torch.testing.assert_close(_outputs(reopened), _outputs(captured), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (("lora", "q=0"), "q=0: a LoRA rank must be an integer >= 1"),
        (("lora", "0"), ">= 1"),
        (("lora", "q=x"), "not an integer"),
        (("parallel", "8", "relu", None, None, 0.0), "--scale"),
        (("parallel", "8", "relu", "dense"), "attn or attn,ffn"),
        (("lora", "8", "relu", None, -1.0), "--alpha"),
    ],
)
def test_bad_specs_are_refused(args, message):
    with pytest.raises(SurgeryError, match=message):
        parse_spec(*args)


def test_parse_spec():
    assert parse_spec("lora", "8").ranks == {"q": 8, "v": 8}
    assert parse_spec("lora", "2", targets="q,k,v,o").ranks == {"q": 2, "k": 2, "v": 2, "o": 2}
    assert parse_spec("lora", "q=2,v=4", alpha=16).to_json()["r"] == {"q": 2, "v": 4}
    assert parse_spec("parallel", "16", scale=4).to_json()["scale"] == 4


@pytest.mark.parametrize("roles, message", [(("x",), "no projection x"), (("q",), "not in the table")])
def test_unknown_projections_are_refused(minilm, tiny_pt2, roles, message):
    captured = minilm if message != "not in the table" else open_model(str(tiny_pt2))
    with pytest.raises(SurgeryError, match=message):
        adapt(captured, LoraSpec({r: 4 for r in roles}))


def test_parallel_beside_attention_spans_query_input_to_output_projection(gpt2_base):
    captured = _copy(gpt2_base)
    report = adapt(captured, AdapterSpec("parallel", r=8, targets="attn,ffn"))
    assert [(s.role, s.path, s.input_path) for s in report.sites[:2]] == [
        ("attn_out", "h.0.attn.c_proj", "h.0.attn.c_attn"),
        ("ffn_out", "h.0.mlp.c_proj", "h.0.mlp.c_fc"),
    ]
