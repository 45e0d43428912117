"""surgery/load.py reads a folder's safetensors without mapping them: loading one into another dtype adds the
converted weights to the process's peak, not the file beside them (measured in a fresh process: VmHWM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import gc, json, sys
from surgery.load import load

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

load(sys.argv[1], dtype="bf16")  # the tiny model: what loading imports and caches, once
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
before = hwm()
loaded = load(sys.argv[2], dtype="bf16")
weights = sum(p.numel() * p.element_size() for p in loaded.module.parameters())
dtypes = sorted({str(p.dtype) for p in loaded.module.parameters()})
print(json.dumps({"added": hwm() - before, "weights": weights, "dtypes": dtypes}))
"""


@pytest.mark.slow
def test_bf16_from_an_fp32_folder_does_not_hold_the_file(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    # "m": 12 layers of similar matrices (no tensor dominates), 0.35 GB in fp32
    for name, vocab, d, ff, layers in [("tiny", 256, 64, 128, 2), ("m", 4096, 768, 2048, 12)]:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=4
        )
        LlamaModel(config).save_pretrained(tmp_path / name)  # fp32, one shard
    file = (tmp_path / "m" / "model.safetensors").stat().st_size
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "tiny"), str(tmp_path / "m")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["dtypes"] == ["torch.bfloat16"]
    assert got["weights"] * 1.9 < file  # the fp32 file is twice the weights kept
    # mapped, the file's pages stayed in the process while it converted: weights + file; read: weights + a tensor
    assert got["added"] < got["weights"] + file / 2, (got, file)
