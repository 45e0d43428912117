"""benchmarks/peers.py's arithmetic and its refusal; the measurement itself needs onnxruntime-genai (an extra,
`pip install -e '.[peers]'`) and a real checkpoint, and is run by hand (benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.peers import against, markdown


def _run(ttft: float, tok_s: float) -> dict:
    return {"ttft_ms": ttft, "decode_tok_s": tok_s, "tokens": [1, 2]}


def test_each_engine_is_measured_against_genai_in_the_same_alternation():
    """The machine slows down in the middle alternation for both engines: the paired ratio stays 2/3 of genai's
    time per token (1.5x the tokens per second), where a ratio of medians would say otherwise."""
    runs = {
        "genai": [_run(60, 20.0), _run(120, 10.0), _run(60, 20.0)],
        "surgery base": [_run(30, 30.0), _run(60, 15.0), _run(30, 30.0)],
    }
    rows = against(runs)
    assert rows["surgery base"]["decode_vs_genai"] == pytest.approx(20 / 30 - 1)
    assert rows["surgery base"]["ttft_vs_genai"] == pytest.approx(-0.5)
    assert rows["genai"]["decode_vs_genai"] == 0 and rows["surgery base"]["decode_tok_s"] == 30.0
    result = {
        "machine": {"cpu": "x", "cores": "2", "onnxruntime": "1"},
        "model": "m",
        "genai_version": "0.18.0",
        "prompt_tokens": 5,
        "threads": 2,
        "alternations": 3,
        "rows": rows,
        "same_tokens": True,
    }
    text = markdown(result)
    assert "| surgery base | 30.0 (-50.0%) | 30.0 | -33.3% [-33.3%, -33.3%] |" in text
    assert "gave the same 32 tokens" in text


def test_without_onnxruntime_genai_it_stops_in_one_line():
    code = "import sys; sys.modules['onnxruntime_genai'] = None; from benchmarks.peers import main; main([])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == ["onnxruntime-genai is not installed: pip install -e '.[peers]'"]
