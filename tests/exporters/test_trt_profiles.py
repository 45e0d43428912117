"""Optimization profiles (exporters/trt_profiles.py): ranges per dynamic axis from the capture, `--engine-shape`
overrides and refusals, a cache graph's prefill and decode profiles, and the profile each run picks. No TensorRT."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from exporters.tensorrt import TrtPlan
from exporters.trt_profiles import (
    DECODE,
    PREFILL,
    AxisRange,
    axis_ranges,
    parse_shapes,
    pick_profile,
    plan_profiles,
    profile_shapes,
    profile_sizes,
)
from surgery.errors import SurgeryError


# --- profiles -------------------------------------------------------------------------------------------


def test_profiles_default_to_the_captured_range_with_opt_at_the_benchmark_point(minilm_base):
    sig = minilm_base.signature
    ranges = axis_ranges(sig)
    assert ranges == {"batch": AxisRange(1, 1, 64), "seq": AxisRange(2, 128, 512)}
    shapes = profile_shapes(sig, ranges)
    assert shapes == {"input_ids": ((1, 2), (1, 128), (64, 512)), "attention_mask": ((1, 2), (1, 128), (64, 512))}


def test_shapes_override_min_opt_max_per_axis(minilm_base):
    ranges = axis_ranges(minilm_base.signature, parse_shapes("batch=1:8:32, seq=16:128:256"))
    assert ranges["batch"] == AxisRange(1, 8, 32) and ranges["seq"] == AxisRange(16, 128, 256)
    assert profile_shapes(minilm_base.signature, ranges)["input_ids"] == ((1, 16), (8, 128), (32, 256))


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch=1:8", "NAME=MIN:OPT:MAX"),
        ("batch=8:1:64", "MIN <= OPT <= MAX"),
        ("tokens=1:2:3", "dynamic axes are batch, seq"),
        ("seq=2:128:4096", "leaves the captured range 2..512"),
    ],
)
def test_bad_shapes_are_refused(minilm_base, text, message):
    with pytest.raises(SurgeryError, match=re.escape(message)):
        axis_ranges(minilm_base.signature, parse_shapes(text))


# --- a causal LM's cache graph: a prefill and a decode profile -------------------------------------------


@pytest.fixture(scope="module")
def lm_signature(lm_config):
    """The cache-graph signature of the tiny Llama-shaped LM (2 layers, 2 KV heads of 16, 256 positions), from
    `tasks.with_past` alone: profiles need the signature, not a capture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.tasks import with_past

    return with_past(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_config("llama"))))[1]


def test_cache_graph_gets_a_prefill_profile_at_past_0_and_a_decode_profile_at_seq_1(lm_signature):
    profiles = plan_profiles(lm_signature, None)
    assert list(profiles) == [PREFILL, DECODE]  # TensorRT's profile 0 and 1
    prefill, decode = profiles.values()
    assert prefill["input_ids"] == prefill["position_ids"] == ((1, 1), (1, 128), (64, 256))
    assert prefill["attention_mask"] == ((1, 1), (1, 128), (64, 256))  # total = past 0 + seq
    assert prefill["past_key_values.1.value"] == ((1, 2, 0, 16), (1, 2, 0, 16), (64, 2, 0, 16))  # empty tensors
    assert decode["input_ids"] == decode["position_ids"] == ((1, 1), (1, 1), (64, 1))
    assert decode["past_key_values.0.key"] == ((1, 2, 1, 16), (1, 2, 128, 16), (64, 2, 255, 16))
    assert decode["attention_mask"] == ((1, 2), (1, 129), (64, 256))  # past + the new token, <= 256 positions
    plan = TrtPlan(Path("m.onnx"), Path("m.plan"), "fp16", profiles, Path("t.cache"))
    args = shlex.split(plan.trtexec())
    flags = [a.split("=", 1)[0] for a in args if a.startswith(("--min", "--opt", "--max"))]
    assert flags == ["--minShapes", "--optShapes", "--maxShapes"] * 2  # one profile per repeat, in order
    assert "past_key_values.0.key:1x2x0x16" in args[3] and "past_key_values.0.key:64x2x255x16" in args[8]
    assert plan.to_json()["profiles"][DECODE]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [64, 1]}


def test_shapes_per_profile_and_shared_axes(lm_signature):
    profiles = plan_profiles(lm_signature, ["batch=1:4:8", "prefill:seq=1:64:128;decode:past=1:100:200"])
    assert profiles[PREFILL]["input_ids"] == ((1, 1), (4, 64), (8, 128))
    assert profiles[DECODE]["past_key_values.0.key"] == ((1, 2, 1, 16), (4, 2, 100, 16), (8, 2, 200, 16))
    unprefixed = plan_profiles(lm_signature, "seq=1:32:64,past=1:32:64")  # seq: the prefill's, past: the decode's
    assert unprefixed[PREFILL]["input_ids"][2] == (64, 64) and unprefixed[DECODE]["input_ids"][2] == (64, 1)
    assert unprefixed[DECODE]["past_key_values.0.key"][2] == (64, 2, 64, 16)


@pytest.mark.parametrize(
    "shapes, message",
    [
        ("prefill:past=1:2:4", "the prefill profile has no cache (past 0)"),
        ("decode:seq=1:2:4", "the decode profile takes one new token (seq 1)"),
        ("total=1:2:4", "total is past + seq"),
        ("chat:batch=1:2:4", "this model's profiles are prefill, decode"),
        ("decode:past=1:2:256", "the decode profile reaches 257 positions (past 256 + seq 1); the model has 256"),
        ("batch=1:2:128", "leaves the captured range 1..64"),
        ("decode:batch=1:2", "NAME=MIN:OPT:MAX"),
    ],
)
def test_bad_cache_shapes_are_refused(lm_signature, shapes, message):
    with pytest.raises(SurgeryError, match=re.escape(message)):
        plan_profiles(lm_signature, shapes)


def test_a_profile_prefix_on_a_graph_without_cache_is_refused(minilm_base):
    with pytest.raises(SurgeryError, match="profiles are default; drop the prefix"):
        plan_profiles(minilm_base.signature, "prefill:batch=1:2:4")


def test_each_run_picks_the_profile_that_takes_its_shapes(lm_signature):
    plan = TrtPlan(Path("m.onnx"), Path("m.plan"), "fp32", plan_profiles(lm_signature, None), Path("t.cache"))
    profiles = plan.sidecar_profiles()
    sizes = profile_sizes(lm_signature, profiles)  # what check_engine runs by default: one shape inside each
    assert sizes == [{"batch": 3, "seq": 37, "past": 0}, {"batch": 3, "seq": 1, "past": 5}]
    for index, size in enumerate(sizes):
        tensors = lm_signature.examples(size, pad=True)
        assert pick_profile(profiles, {n: tuple(t.shape) for n, t in zip(lm_signature.names, tensors)}) == index
    chunk = {"input_ids": (1, 4), "attention_mask": (1, 12), "past_key_values.0.key": (1, 2, 8, 16)}
    with pytest.raises(
        SurgeryError,
        match=r"no optimization profile takes input_ids \[1, 4\].*; its profiles take "
        r"prefill: .*past_key_values.0.key \[1, 2, 0, 16\]\.\.\[64, 2, 0, 16\]; decode: input_ids",
    ):
        pick_profile(profiles, chunk, names=[PREFILL, DECODE])
