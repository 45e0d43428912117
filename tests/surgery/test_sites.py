"""Sites: presets on real and small HF models, the graph rule on a hand-written Transformer, --targets."""

from __future__ import annotations

import pytest

from surgery.errors import SurgeryError
from surgery.pipeline import open_model
from surgery.sites import ATTN_OUT, FFN_OUT, TARGET, find_sites


def test_minilm_preset_finds_both_projections_of_every_layer(minilm_base):
    sites = find_sites(minilm_base.gm, "bert")
    assert [(s.layer, s.role) for s in sites] == [(i, r) for i in range(6) for r in (ATTN_OUT, FFN_OUT)]
    assert sites[0].path == "encoder.layer.0.attention.output.dense"
    assert sites[1].path == "encoder.layer.0.output.dense"
    assert {s.width for s in sites} == {384}


PRESET_CASES = [
    ("gpt2", "h.{}.attn.c_proj", "h.{}.mlp.c_proj"),
    ("llama", "layers.{}.self_attn.o_proj", "layers.{}.mlp.down_proj"),
    ("t5", "encoder.block.{}.layer.0.SelfAttention.o", "encoder.block.{}.layer.1.DenseReluDense.wo"),
]


@pytest.mark.parametrize("model_type, attn, ffn", PRESET_CASES)
def test_presets_on_small_configs(small_config, model_type, attn, ffn):
    captured = open_model(str(small_config(model_type)))
    assert captured.source.model_type == model_type
    sites = find_sites(captured.gm, model_type)
    expected = [(attn.format(i), ATTN_OUT) for i in range(2)] + [(ffn.format(i), FFN_OUT) for i in range(2)]
    assert sorted((s.path, s.role) for s in sites) == sorted(expected)
    assert {s.width for s in sites} == {64}


def test_graph_rule_finds_two_sites_per_block_of_an_unknown_model(tiny_pt2):
    captured = open_model(str(tiny_pt2))
    assert captured.source.model_type is None
    sites = find_sites(captured.gm, None)
    assert [(s.path, s.role) for s in sites] == [
        ("blocks.0.proj", ATTN_OUT),
        ("blocks.0.fc2", FFN_OUT),
        ("blocks.1.proj", ATTN_OUT),
        ("blocks.1.fc2", FFN_OUT),
    ]


def test_graph_rule_agrees_with_the_bert_preset(minilm_base):
    by_rule = find_sites(minilm_base.gm, None)
    by_preset = find_sites(minilm_base.gm, "bert")
    assert [(s.path, s.role) for s in by_rule] == [(s.path, s.role) for s in by_preset]


def test_targets_override_the_preset(minilm_base):
    sites = find_sites(minilm_base.gm, "bert", targets=r"attention\.self\.(query|value)$")
    assert len(sites) == 12
    assert {s.role for s in sites} == {TARGET}
    assert sites[0].path == "encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("regex, message", [("nothing_here", "matches none"), ("(", "not a valid regular expression")])
def test_bad_targets_are_refused(minilm_base, regex, message):
    with pytest.raises(SurgeryError, match=message):
        find_sites(minilm_base.gm, "bert", targets=regex)
