"""The real tier's causal LM: SmolLM2-135M (surgery/zoo.py) captured with its KV cache, Houlsby r=8 with random
weights, exported baked; `exporters.runtime.Generator` gives transformers' greedy tokens for 32 new tokens, and the
logits of every step agree within the parity tolerance. One base matrix scaled by 1.01 in the reference is refused
even against torch's own noise (the parity rule's NOISE_K, measured on this model in benchmarks/parity_noise.py)."""

from __future__ import annotations

import copy
import time

import numpy as np

import pytest
import torch

from exporters.onnx import export_onnx
from exporters.runtime import Generator, TextTokenizer
from exporters.verify import check_onnx
from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.parity import compare
from surgery.pipeline import adapt, open_model
from surgery.zoo import fetch
from tests.lm_reference import hf_generate, hf_model, until_near_tie

pytestmark = [pytest.mark.real, pytest.mark.timeout(3600)]
PROMPT = "The three primary colours are"


def test_smollm2_greedy_generation_equals_transformers(tmp_path):
    from transformers import AutoConfig

    gguf = fetch("smollm2-135m")  # the .gguf file
    captured = open_model(str(gguf), task="causal-lm")
    assert captured.task == "causal-lm"
    spec = AdapterSpec("houlsby", r=8)
    report = adapt(captured, spec)
    assert len(report.sites) == 60 and report.trainable == 588_000  # as feature-extraction: 2 per layer, 2L(2dr+d+r)
    stand_in_weights(captured.gm, seed=1)
    start = time.perf_counter()
    export = export_onnx(captured.gm, captured.signature, tmp_path / "smollm2.onnx")
    print(f"export {time.perf_counter() - start:.0f} s, {export.parity.max_rel_diff:.2e} of max|torch|")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reference = hf_model(config, captured, spec, report.sites)
    tok = TextTokenizer.from_folder(gguf.parent)
    prompt = tok.encode(PROMPT)
    want, want_logits = hf_generate(reference, prompt, 32)
    got = Generator(tmp_path / "smollm2.onnx").generate(prompt, 32, keep_logits=True)
    print(f"{tok.decode(got.tokens[0])!r}: ttft {got.ttft_s * 1e3:.0f} ms, {got.tokens_per_s:.1f} tok/s")
    assert got.tokens[0] == want
    for step, (a, b) in enumerate(zip(want_logits, got.logits)):
        parity = compare([a], [b], names=["logits"], where=f"step {step}")
        assert parity.ok, parity.summary()
    weight = captured.gm.get_parameter("model.layers.15.mlp.down_proj.weight")
    with torch.no_grad():
        weight.mul_(1.01)
    wrong = check_onnx(tmp_path / "smollm2.onnx", captured.gm, captured.signature)
    assert not wrong.ok and "torch's own" in wrong.summary(), wrong.summary()


# A passage long enough that its tokens fill Gemma 3's local window (512 positions) and more.
PASSAGE = " ".join(
    [
        "The river rises in the high moorland, where rain falls on more than two hundred days of the year.",
        "For its first miles it runs fast and cold over granite, through a valley of heather and bracken,",
        "past farms whose walls were built from the stones the plough turned up. Below the old mill the valley",
        "widens, the water slows, and alders and willows crowd the banks. Otters returned here some thirty years",
        "ago, once the tannery upstream had closed and the fields no longer drained into the stream. In the town",
        "the river passes under five bridges: a packhorse bridge too narrow for a cart, a stone bridge of three",
        "arches, an iron railway bridge painted green, a concrete road bridge, and a footbridge that sways when",
        "children run across it. Beyond the town the river meets the tide, and for the last few miles it is salt",
        "twice a day, brown with mud at low water and silver at high water, until it opens into a wide estuary",
        "where wading birds feed in their thousands through the winter. Fishermen once worked the estuary for",
        "salmon with nets strung between boats; the last licence was given up when the catch no longer paid for",
        "the boat. Today the quay holds a museum, a cafe, and a yard where volunteers restore wooden boats. In",
        "summer visitors walk the path along the northern bank from the quay to the lighthouse, a distance of",
        "about four miles, and return by the ferry that crosses from the sands to the harbour every half hour.",
        "The town itself grew up around the lowest bridging point of the river. Its market charter dates from the",
        "thirteenth century, and a market is still held in the square every Thursday, though the cattle pens",
        "behind the church were cleared long ago to make room for a car park. Wool made the town rich: merchants",
        "built tall houses of timber and plaster along the main street, and their guild hall, with its carved",
        "beams and painted ceiling, now serves as the library. When the trade moved north to the mill towns the",
        "population fell by half, and for a century little was built. The railway arrived late and left early;",
        "the station is a pottery now, and the line is a cycle path that follows the valley for eleven miles. In",
        "recent years the town has grown again, as families moved out from the city and people who work from",
        "home found that the broadband was good enough. The primary school has opened a new classroom, the",
        "bakery has a queue on Saturday mornings, and the old cinema, closed for thirty years, shows films again",
        "on Friday and Saturday nights, run by volunteers who repaired the seats one row at a time.",
    ]
)


def test_gemma3_greedy_generation_past_the_sliding_window_equals_transformers(tmp_path):
    """Gemma 3 270M: five local layers (window 512) to each global one. The prompt ends 12 tokens short of the window,
    so the decode steps cross it; the tokens agree up to the reference's first near tie, the logits before it."""
    from transformers import AutoConfig

    gguf = fetch("gemma3-270m")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    window = config.sliding_window
    assert window < config.max_position_embeddings and "sliding_attention" in config.layer_types
    captured = open_model(str(gguf), task="causal-lm")
    assert captured.task == "causal-lm"
    spec = AdapterSpec("houlsby", r=8)
    report = adapt(captured, spec)
    assert len(report.sites) == 2 * config.num_hidden_layers
    stand_in_weights(captured.gm, seed=1)
    start = time.perf_counter()
    export = export_onnx(captured.gm, captured.signature, tmp_path / "gemma3.onnx")
    print(f"export {time.perf_counter() - start:.0f} s, {export.parity.max_rel_diff:.2e} of max|torch|")
    reference = hf_model(config, captured, spec, report.sites)
    tok = TextTokenizer.from_folder(gguf.parent)
    prompt = tok.encode(PASSAGE)
    assert len(prompt) > window, f"the passage must outgrow the window: {len(prompt)} tokens"
    prompt = prompt[: window - 12]
    new = 40
    want, want_logits = hf_generate(reference, prompt, new)
    got = Generator(tmp_path / "gemma3.onnx").generate(prompt, new, keep_logits=True)
    print(f"{tok.decode(got.tokens[0])!r}: ttft {got.ttft_s * 1e3:.0f} ms, {got.tokens_per_s:.1f} tok/s")
    parities = [
        compare([a], [b], names=["logits"], where=f"step {k}") for k, (a, b) in enumerate(zip(want_logits, got.logits))
    ]
    sure = until_near_tie(want_logits, 2 * max(p.atol + p.rtol * p.outputs["logits"].ref_max for p in parities))
    print(f"{sure} of {new} steps before a near tie; worst logits {max(p.max_abs_diff for p in parities[:sure]):.2e}")
    assert sure > 12, "the steps past the window must be compared"
    assert got.tokens[0][:sure] == want[:sure]
    for parity in parities[:sure] if got.tokens[0] != want else parities:
        assert parity.ok, parity.summary()
    unwindowed = copy.deepcopy(config)
    unwindowed.sliding_window = config.max_position_embeddings  # every key in reach: a model without the window
    full_logits = hf_generate(hf_model(unwindowed, captured, spec, report.sites), prompt, new)[1]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(full_logits[12:sure], want_logits[12:sure]))
    print(f"lifting the window moves the logits past it by up to {moved:.2e}")
    assert moved > 100 * max(p.max_abs_diff for p in parities[:sure]), "the window must matter to what is compared"


def test_smollm2_int4_greedy_generation_equals_its_dequantized_reference(tmp_path):
    """SmolLM2-135M exported with `quantize=int4` (block 32, accuracy level 1: fp32 activations, so the weights are
    the only rounding): `Generator` gives the greedy tokens of transformers holding the same dequantized weights, up
    to the reference's first near tie, and the logits before it agree within the parity tolerance."""
    import dataclasses

    import onnx
    from transformers import AutoConfig

    from exporters.quantize import Quantization, dequantized, float_weights

    gguf = fetch("smollm2-135m")
    captured = open_model(str(gguf), task="causal-lm")
    start = time.perf_counter()
    export_onnx(captured.gm, captured.signature, tmp_path / "fp32.onnx")
    quantized = export_onnx(
        captured.gm, captured.signature, tmp_path / "int4.onnx", quantize=Quantization(bits=4, accuracy_level=1)
    )
    print(f"exports {time.perf_counter() - start:.0f} s; int4 from fp32: {quantized.quantization.from_float}")
    weights = float_weights(onnx.load(str(tmp_path / "fp32.onnx")))
    module = dequantized(captured.gm, onnx.load(str(tmp_path / "int4.onnx")), weights)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reference = hf_model(config, dataclasses.replace(captured, gm=module))
    prompt = TextTokenizer.from_folder(gguf.parent).encode(PROMPT)
    want, want_logits = hf_generate(reference, prompt, 32)
    float_tokens = hf_generate(hf_model(config, captured), prompt, 32)[0]
    got = Generator(tmp_path / "int4.onnx").generate(prompt, 32, keep_logits=True)
    parities = [
        compare([a], [b], names=["logits"], where=f"step {k}") for k, (a, b) in enumerate(zip(want_logits, got.logits))
    ]
    sure = until_near_tie(want_logits, 2 * max(p.atol + p.rtol * p.outputs["logits"].ref_max for p in parities))
    print(f"{sure} of 32 steps before a near tie; the float model's tokens differ: {float_tokens != want}")
    assert sure >= 8, "too few steps decided beyond doubt to compare"
    assert got.tokens[0][:sure] == want[:sure]
    for parity in parities[:sure]:
        assert parity.ok, parity.summary()
