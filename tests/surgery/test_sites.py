"""Sites: presets on real and small HF models, the graph rule on a hand-written Transformer, --targets."""

from __future__ import annotations

import pytest

from surgery.errors import SurgeryError
from surgery.pipeline import open_model
from surgery.architectures import ARCHITECTURES, CROSS_OUT, block_of
from surgery.sites import ATTN_OUT, FFN_OUT, TARGET, find_sites, graph_rule_sites
from tests.families import CAUSAL_LMS, FAMILIES, SLIDING_LMS, write_config


def test_minilm_preset_finds_both_projections_of_every_layer(minilm_base):
    sites = find_sites(minilm_base.gm, "bert")
    assert [(s.layer, s.role) for s in sites] == [(i, r) for i in range(6) for r in (ATTN_OUT, FFN_OUT)]
    assert sites[0].path == "encoder.layer.0.attention.output.dense"
    assert sites[1].path == "encoder.layer.0.output.dense"
    assert {s.width for s in sites} == {384}


PRESET_CASES = [
    ("gpt2", "h.{}.attn.c_proj", "h.{}.mlp.c_proj"),
    ("llama", "layers.{}.self_attn.o_proj", "layers.{}.mlp.down_proj"),
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


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A family of the matrix built from its small config and captured, once per module."""
    captured = {}

    def get(model_type: str):
        if model_type not in captured:
            captured[model_type] = open_model(str(write_config(model_type, tmp_path_factory.mktemp(model_type))))
        return captured[model_type]

    return get


# The graph rule against the table: one family per thing the rule must see in `make test` (post-norm, Conv1D,
# a module path that prefixes another, a norm between the sublayer and the add, a parallel block, a mixture of
# experts, decoder blocks, a scaled residual, an attention-pooling head, experts plus a shared expert, a convolutional
# front end and position embedding added to the residual before the blocks); every other family of the table under
# `make test-matrix`.
FAST = {
    "bert",
    "gpt2",
    "mpnet",
    "gemma3_text",
    "gptj",
    "mixtral",
    "t5",
    "granite",
    "siglip_vision_model",
    "qwen2_moe",
    "wav2vec2",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type",
    [t if t in FAST else pytest.param(t, marks=pytest.mark.matrix) for t in ARCHITECTURES if t in FAMILIES],
)
def test_graph_rule_finds_the_tables_sites(model_type, family):
    captured = family(model_type)
    by_table = find_sites(captured.gm, model_type)
    by_rule = graph_rule_sites(captured.gm)
    assert [(s.path, s.role, s.node) for s in by_rule] == [(s.path, s.role, s.node) for s in by_table]
    assert len({s.node for s in by_rule}) == len(by_rule)  # one node is one site
    layers = len({block_of(s.path) for s in by_rule})
    assert layers == (4 if model_type in ENCODER_DECODER else 2)  # encoder-decoders: 2 + 2 blocks


@pytest.mark.parametrize(
    "family", [f if f == "gemma3" else pytest.param(f, marks=pytest.mark.slow) for f in SLIDING_LMS]
)
def test_graph_rule_finds_the_tables_sites_in_sliding_window_causal_lms(family, lm_base):
    """The same rule on the cache graph (surgery/tasks.py), whose local layers take a windowed mask: two sites a
    layer, the table's, at the HF module paths."""
    captured = lm_base(family)
    assert captured.task == "causal-lm"
    by_rule = graph_rule_sites(captured.gm)
    assert [(s.path, s.role, s.node) for s in by_rule] == [
        (s.path, s.role, s.node) for s in find_sites(captured.gm, CAUSAL_LMS[family][0])
    ]
    assert [(s.path, s.role) for s in by_rule] == [
        (f"model.layers.{i}.{p}", role)
        for i in range(2)
        for p, role in (("self_attn.o_proj", ATTN_OUT), ("mlp.down_proj", FFN_OUT))
    ]


def test_every_family_of_the_table_has_a_small_config():
    assert set(ARCHITECTURES) - set(FAMILIES) == {"mt5"}


@pytest.mark.parametrize(
    "model_type, sites",
    [
        # MPNet: `attention.attn` (its scores are matmuls) ends in the node `attention.attn.o` ends in: one site
        ("mpnet", ["encoder.layer.{}.attention.attn.o", "encoder.layer.{}.output.dense"]),
        # Gemma 3: o_proj -> post_attention_layernorm -> +
        ("gemma3_text", ["layers.{}.self_attn.o_proj", "layers.{}.mlp.down_proj"]),
        # GPT-J: attention and MLP read one input and are added to the residual together
        ("gptj", ["h.{}.attn.out_proj", "h.{}.mlp.fc_out"]),
        # Granite: o_proj -> * residual_multiplier -> +
        ("granite", ["layers.{}.self_attn.o_proj", "layers.{}.mlp.down_proj"]),
        # Mixtral: one site after the combined experts, not one per expert
        ("mixtral", ["layers.{}.self_attn.o_proj", "layers.{}.mlp"]),
        # Qwen2-MoE: the routed experts added to the shared expert inside `mlp`: still one site, after both
        ("qwen2_moe", ["layers.{}.self_attn.o_proj", "layers.{}.mlp"]),
    ],
)
def test_graph_rule_on_real_architectures(model_type, sites, family):
    captured = family(model_type)
    found = graph_rule_sites(captured.gm)
    assert [(s.path, s.layer, s.role) for s in found] == [
        (p.format(i), i, role) for i in range(2) for p, role in zip(sites, (ATTN_OUT, FFN_OUT))
    ]
    assert {s.width for s in found} == {64}


ENCODER_DECODER = {
    "bart": ("{}.layers.{}.", ("self_attn.out_proj", "fc2"), ("self_attn.out_proj", "encoder_attn.out_proj", "fc2")),
    **{
        t: ("{}.layers.{}.", ("self_attn.out_proj", "fc2"), ("self_attn.out_proj", "encoder_attn.out_proj", "fc2"))
        for t in ("pegasus", "marian", "mbart", "m2m_100", "whisper")
    },
    "t5": (
        "{}.block.{}.layer.",
        ("0.SelfAttention.o", "1.DenseReluDense.wo"),
        ("0.SelfAttention.o", "1.EncDecAttention.o", "2.DenseReluDense.wo"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ENCODER_DECODER)
def test_encoder_decoders_are_captured_with_three_sites_per_decoder_block(model_type, family):
    captured = family(model_type)
    assert captured.signature.outputs == ("last_hidden_state", "encoder_last_hidden_state")
    prefix, enc, dec = ENCODER_DECODER[model_type]
    encoder = [(prefix.format("encoder", i) + p, r) for i in range(2) for p, r in zip(enc, (ATTN_OUT, FFN_OUT))]
    roles = (ATTN_OUT, CROSS_OUT, FFN_OUT)
    decoder = [(prefix.format("decoder", i) + p, r) for i in range(2) for p, r in zip(dec, roles)]
    assert [(s.path, s.role) for s in graph_rule_sites(captured.gm)] == encoder + decoder
    assert [(s.path, s.role) for s in find_sites(captured.gm, model_type)] == encoder + decoder
