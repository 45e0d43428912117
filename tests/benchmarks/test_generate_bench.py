"""The generate benchmark's torch rows (`--backend torch`, `torch-cuda`): `TorchGenerator` must decode what the
model decodes. Held to transformers' greedy `generate` on the same weights with the adapters as hooks
(tests/lm_reference.py), Houlsby, on the tiny Llama-shaped LM (grouped-query attention). And its table gives no
verdict on the 3% target when its control (lora-merged, the base graph) is further than that from base."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.generate import TorchGenerator, adapted_variant, overheads, table
from surgery.adapters import AdapterSpec
from surgery.insert import sites_for
from tests.lm_reference import hf_generate, hf_model

PROMPT = [5, 17, 300, 42, 9, 77, 123]


@pytest.mark.slow  # benchmark code: make test stays under 6 minutes, CI runs it in make test-slow
def test_torch_generator_decodes_the_tokens_transformers_decodes(lm_base, lm_config):
    base = lm_base("llama")
    spec = AdapterSpec("houlsby", r=8)  # what adapted_variant("houlsby") inserts, with random non-zero weights
    sites = sites_for(base.gm, base.source.model_type, spec)
    houlsby = adapted_variant("houlsby", base)
    want = hf_generate(hf_model(lm_config("llama"), houlsby, spec, sites), PROMPT, 12)[0]
    assert want != hf_generate(hf_model(lm_config("llama"), base), PROMPT, 12)[0], "the adapters must change tokens"
    out = TorchGenerator(houlsby, "cpu").generate([PROMPT, PROMPT], 12)
    assert out.tokens == [want, want]
    assert out.steps == 12 and out.ttft_s > 0 and out.tokens_per_s > 0


@pytest.mark.parametrize("merged_tok_s, verdict", [(100.5, "met"), (112.0, "no verdict")])
def test_the_table_gives_a_verdict_only_when_its_control_is_within_the_target(merged_tok_s, verdict):
    def row(tok_s):
        return {"prefill_128_ms": 300.0, "ttft_ms": 40.0, "decode_b1_tok_s": tok_s, "decode_b8_tok_s_per_stream": 10.0}

    rows = {"base": row(100.0), "houlsby": row(99.0), "lora-merged": row(merged_tok_s)}
    text = table("m", rows, overheads(rows), argparse.Namespace(backend="ort", threads=2, runs=5), 5)
    houlsby = next(line for line in text.splitlines() if line.startswith("| houlsby"))
    assert f"+1.0% {verdict}" in houlsby if verdict == "met" else "+1.0%, no verdict" in houlsby
    assert ("No verdict: lora-merged" in text) == (verdict == "no verdict")


@pytest.mark.slow  # a subprocess importing torch and transformers
def test_ort_cuda_without_onnxruntime_gpu_stops_at_once_in_one_line(tmp_path):
    """`--backend ort-cuda` where onnxruntime has no CUDA provider: one line that says what is missing and how to
    get it, before any model is opened or exported (nothing is written)."""
    import subprocess
    import sys

    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the refusal cannot be seen")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.generate", "--backend", "ort-cuda", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == [
        "--backend ort-cuda: onnxruntime has no CUDAExecutionProvider (pip install -e '.[gpu]': onnxruntime-gpu)"
    ]
    assert not (tmp_path / "out").exists()
