"""The generate benchmark's torch rows (`--backend torch`, `torch-cuda`): `TorchGenerator` must decode what the
model decodes. Held to transformers' greedy `generate` on the same weights with the adapters as hooks
(tests/lm_reference.py), Houlsby, on the tiny Llama-shaped LM (grouped-query attention). And its table gives no
verdict on the 3% target when its control (lora-merged, the base graph) is further than that from base. The pair
method end to end on a tiny Llama shape: each variant timed beside base in fresh processes, exports kept in --work."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.generate import METRICS, TorchGenerator, adapted_variant, summarize, table
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


def _pairs(variant: str, base_tok_s: list[float], case_tok_s: list[float]) -> list[dict]:
    """One round of a pair: base and `variant`, decode b1 as given, the other measures equal."""

    def run(tok_s: float) -> dict[str, float]:
        return dict(zip(METRICS, (300.0, 40.0, tok_s, 10.0)))

    return [{"base": [run(t) for t in base_tok_s], variant: [run(t) for t in case_tok_s]}]


def test_the_overhead_is_the_median_of_paired_ratios_not_a_ratio_of_medians():
    """A slow spell hits both sides of a pair: the pairs say +1% each time, their medians would say -19%."""
    pairs = {"houlsby": _pairs("houlsby", [100.0, 50.0, 100.0], [99.0, 49.5, 99.0])}
    rows, over = summarize(pairs)
    assert over["houlsby"]["decode_b1"] == pytest.approx(1 / 0.99 - 1)
    lo, hi = over["houlsby"]["decode_b1_interval"]
    assert lo == pytest.approx(hi) == pytest.approx(1 / 0.99 - 1)  # the same ratio every time: no spread
    assert rows["houlsby"]["decode_b1_tok_s"] == 99.0 and over["houlsby"]["prefill"] == 0


@pytest.mark.parametrize("merged_tok_s, verdict", [(100.5, "met"), (112.0, "no verdict")])
def test_the_table_gives_a_verdict_only_when_its_control_is_within_the_target(merged_tok_s, verdict):
    pairs = {
        "houlsby": _pairs("houlsby", [100.0, 100.0], [99.0, 99.0]),
        "lora-merged": _pairs("lora-merged", [100.0, 100.0], [merged_tok_s, merged_tok_s]),
    }
    rows, over = summarize(pairs)
    args = argparse.Namespace(backend="ort", threads=2, rounds=1, alternations=2)
    houlsby = next(line for line in table("m", rows, over, args, 5).splitlines() if line.startswith("| houlsby"))
    assert f"+1.0% [+1.0%, +1.0%] {verdict}" in houlsby
    assert ("No verdict: lora-merged" in table("m", rows, over, args, 5)) == (verdict == "no verdict")


@pytest.mark.slow  # three exports and four generation processes
def test_the_pair_method_end_to_end_on_a_tiny_llama(lm_config, tmp_path):
    """`python -m benchmarks.generate` on a config: every variant exported once into --work, timed beside base in a
    fresh process per round; the JSON has every pair, the table a row per variant. Run again, it exports nothing."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "benchmarks.generate", "--model", str(lm_config("llama")), "--variants"]
    cmd += ["base,houlsby,lora-merged", "--rounds", "2", "--alternations", "1", "--work", str(tmp_path / "work")]
    cmd += ["-o", str(tmp_path / "out")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("exported and checked") == 3
    label = lm_config("llama").parent.name
    result = json.loads((tmp_path / "out" / f"generate_{label}.json").read_text())
    assert set(result["pairs"]) == {"houlsby", "lora-merged"} and result["rounds"] == 2
    for variant, rounds in result["pairs"].items():
        assert len(rounds) == 2 and all(set(r) == {"base", variant} and len(r[variant]) == 1 for r in rounds)
        assert all(r[variant][0]["decode_b1_tok_s"] > 0 for r in rounds)
    lines = (tmp_path / "out" / f"generate_{label}.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith("| ")][1:] == [
        "| base",
        "| houlsby",
        "| lora-merged",
    ]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "exported" not in again.stdout, again.stderr[-3000:]


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
        [sys.executable, "-m", "benchmarks.generate", "--backend", "ort-cuda", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == [
        "--backend ort-cuda: onnxruntime has no CUDAExecutionProvider (pip install -e '.[gpu]': onnxruntime-gpu)"
    ]
    assert not (tmp_path / "out").exists()
