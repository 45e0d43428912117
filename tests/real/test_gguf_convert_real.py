"""The real tier's GGUF conversion: SmolLM2-135M's Q4_1 GGUF (surgery/zoo.py) through `surgery convert` into a Hugging
Face folder, which holds, tensor by tensor, what transformers' own GGUF load gives, a tokenizer that encodes as the
GGUF's does, and loads in transformers to the same logits. (The 1.5B GGUF past 2 GB is benchmarks/large.py --real.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.zoo import fetch
from tests.conftest import ROOT, SURGERY

pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]
TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # The three primary colours"


def test_smollm2_gguf_converts_to_transformers_own_load(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch("smollm2-135m")
    folder = tmp_path / "smollm2"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    p = subprocess.run(
        [*SURGERY, "convert", str(gguf), str(folder), "--json"], capture_output=True, text=True, env=env, timeout=1200
    )
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["model_type"] == "llama" and result["dtype"] == "fp32" and result["tokenizer"]
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    got = load_file(str(folder / "model.safetensors"))
    want = reference.state_dict()
    assert set(want) - set(got) == {"lm_head.weight"}  # tied to the embedding, stored once
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT).ids
    assert ids == AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(TEXT)["input_ids"]
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(converted(x).logits, reference(x).logits)


def test_a_non_gguf_file_is_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(Path(__file__).read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    p = subprocess.run([*SURGERY, "convert", str(bad), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "not a GGUF file" in lines[0], p.stderr
    assert not (tmp_path / "out").exists()
