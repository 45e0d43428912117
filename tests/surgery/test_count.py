"""Counts on the meta device: the seed's GPT-3 175B table, and equality with the parameters a real insert
pass creates on small configs and on the pretrained MiniLM."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from surgery.adapters import AdapterSpec, LoraSpec
from surgery.count import count
from surgery.errors import SurgeryError
from surgery.pipeline import adapt, open_model

L, D = 96, 12288

# The seed's table (GPT-3 175B): spec, the printed figure, the exact count.
SEED_ROWS = [
    ("houlsby r=1", AdapterSpec("houlsby", r=1), "7.1M", 2 * L * (2 * D * 1 + D + 1)),
    ("houlsby r=4", AdapterSpec("houlsby", r=4), "21.2M", 2 * L * (2 * D * 4 + D + 4)),
    ("houlsby r=8", AdapterSpec("houlsby", r=8), "40.1M", 40_109_568),
    ("houlsby r=16", AdapterSpec("houlsby", r=16), "77.9M", 2 * L * (2 * D * 16 + D + 16)),
    ("houlsby r=64", AdapterSpec("houlsby", r=64), "304.4M", 2 * L * (2 * D * 64 + D + 64)),
    ("lora r_q=r_v=8", LoraSpec({"q": 8, "v": 8}), "37.7M", L * 2 * 8 * 2 * D),
    ("lora r_q=r_k=r_v=r_o=4", LoraSpec({"q": 4, "k": 4, "v": 4, "o": 4}), "37.7M", L * 4 * 4 * 2 * D),
    ("lora r_v=2", LoraSpec({"v": 2}), "4.7M", L * 2 * 2 * D),
]


@pytest.mark.parametrize("spec, printed, exact", [r[1:] for r in SEED_ROWS], ids=[r[0] for r in SEED_ROWS])
def test_gpt3_175b_reproduces_the_seed_table(spec, printed, exact):
    report = count("gpt3-175b", spec)
    assert report.trainable == exact == report.formula
    assert f"{report.trainable / 1e6:.1f}M" == printed
    assert report.layers == L and report.d_model == D
    assert 174e9 < report.base < 176e9
    assert report.pack_bytes() == {"fp32": 4 * exact, "fp16": 2 * exact}


SPECS = [
    AdapterSpec("houlsby", r=4),
    AdapterSpec("pfeiffer", r=8, activation="gelu"),
    AdapterSpec("parallel", r=4, scale=4.0),
    AdapterSpec("parallel", r=4, scale=4.0, targets="attn,ffn"),
    LoraSpec({"q": 4, "v": 4}),
    LoraSpec({"q": 2, "k": 3, "v": 4, "o": 5, "ffn_in": 2, "ffn_out": 6}, alpha=16),
]


@pytest.fixture(scope="module")
def bases(small_config, minilm_base):
    return {
        "bert": ("minilm", minilm_base),
        **{t: (str(small_config(t)), open_model(str(small_config(t)))) for t in ("gpt2", "llama", "t5")},
    }


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s.to_json()["r"]) + s.method)
def test_count_equals_the_parameters_the_insert_pass_creates(bases, model_type, spec):
    source, base = bases[model_type]
    captured = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    inserted = adapt(captured, spec)
    counted = count(source, spec)
    assert counted.trainable == inserted.trainable > 0
    assert counted.sites == len(inserted.sites)
    assert counted.base == inserted.total - inserted.trainable


def test_llama_lora_counts_the_narrower_grouped_kv_projections(bases):
    report = count(bases["llama"][0], LoraSpec({"q": 4, "k": 4}))
    # q is 64 -> 64, k is 64 -> 32 (2 of 4 heads): 2 layers x 4 x ((64 + 64) + (64 + 32))
    assert report.trainable == 2 * 4 * (128 + 96)
    assert report.formula == 2 * 2 * 4 * 2 * 64  # the d x d formula does not hold here, and the count says so


@pytest.mark.parametrize(
    "source, spec, message",
    [
        ("no/such/config.json", AdapterSpec(), "no such config"),
        ("gpt3-175b", LoraSpec({"x": 4}), "no projection x"),
        ("gpt3-175b", AdapterSpec(r=12288), "narrower"),
    ],
)
def test_bad_counts_are_refused(source, spec, message):
    with pytest.raises(SurgeryError, match=message):
        count(source, spec)


def test_rank_zero_is_refused():
    with pytest.raises(SurgeryError, match=">= 1"):
        LoraSpec.parse("q=0")


# Families whose sites are not all projections, or not all of one block shape: the count on the meta device still
# equals the insert pass on the captured graph.
NEW_FAMILY_CASES = [
    ("mixtral", AdapterSpec("houlsby", r=4)),  # ffn_out is the MoE block's output, not a projection
    ("bart", AdapterSpec("houlsby", r=4)),  # decoder blocks: attn_out, cross_out, ffn_out
    ("bart", AdapterSpec("pfeiffer", r=4)),
    ("phi3", LoraSpec({"q": 2, "k": 3, "v": 4, "ffn_gate": 5, "ffn_in": 6})),  # slices of fused projections
    ("gemma3_text", AdapterSpec("parallel", r=4, targets="attn,ffn")),
    ("wav2vec2", AdapterSpec("houlsby", r=4)),  # a convolutional front end before the blocks
    ("whisper", LoraSpec({"q": 2, "v": 3, "ffn_out": 4})),  # encoder and decoder blocks
]


@pytest.mark.slow
@pytest.mark.parametrize("model_type, spec", NEW_FAMILY_CASES, ids=lambda x: x if isinstance(x, str) else x.method)
def test_count_equals_insert_on_other_families(model_type, spec, tmp_path):
    from tests.families import write_config

    config = write_config(model_type, tmp_path)
    inserted = adapt(open_model(str(config)), spec)
    counted = count(str(config), spec)
    assert counted.trainable == inserted.trainable > 0
    assert counted.sites == len(inserted.sites)


@pytest.mark.slow
def test_bart_houlsby_adapts_three_sites_per_decoder_block(tmp_path):
    from tests.families import write_config

    report = count(str(write_config("bart", tmp_path)), AdapterSpec("houlsby", r=4))
    assert report.sites == 2 * 2 + 2 * 3  # 2 encoder blocks x 2, 2 decoder blocks x 3
    assert report.trainable == 10 * (2 * 64 * 4 + 64 + 4)
    assert report.formula == 2 * report.layers * (2 * 64 * 4 + 64 + 4)  # the seed's formula knows no decoder
