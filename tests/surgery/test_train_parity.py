"""Parity of `surgery train` with PEFT's LoRA (the reference: tests/data/train_parity/make_peft_reference.py, whose
docstring lists the settings matched): a tiny Llama, the same initial LoRA weights, data order and settings, no
dropout, fp32 on the CPU. Per-step losses agree over 50 steps (the first within 1e-5 relative, every one within
1e-3), and each final LoRA tensor within 10 times the reference's own spread (its 1- vs 2-thread runs) plus 1e-4,
in relative Frobenius distance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.adapters import parse_spec
from surgery.bundle import SUFFIX, save_adapted
from surgery.pipeline import adapt, open_model
from surgery.train import TrainConfig, prepare, train

DATA = Path(__file__).resolve().parents[1] / "data" / "train_parity"
SPREAD_FACTOR, FLOOR = 10.0, 1e-4


@pytest.mark.slow
def test_lora_training_matches_peft(tmp_path):
    from safetensors.torch import load_file

    ref = json.loads((DATA / "peft-lora.json").read_text())
    s = ref["settings"]
    captured = open_model(str(DATA / "llama-tiny"))
    spec = parse_spec("lora", str(s["r"]))
    report = adapt(captured, spec, seed=0)
    path = tmp_path / f"tiny{SUFFIX}"
    save_adapted(path, captured, spec, report)
    config = TrainConfig(
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        weight_decay=s["weight_decay"],
        warmup=s["warmup"],
        max_grad_norm=s["max_grad_norm"],
        seed=s["seed"],
        dropout=False,
        device="cpu",
    )
    p = prepare(str(path), str(DATA / "data.jsonl"), None, "causal-lm", {"prompt": "prompt"}, config)
    initial = load_file(DATA / "peft-lora.initial.safetensors")
    params = dict(p.model.named_trainable_parameters())
    assert set(params) == set(initial)
    with torch.no_grad():
        for name, t in initial.items():
            params[name].copy_(t)
    result = train(p, config, None)
    want = ref["losses"]
    assert len(result.losses) == len(want) >= 50
    rel = [abs(a - b) / abs(b) for a, b in zip(result.losses, want)]
    assert rel[0] <= 1e-5, rel[0]
    assert max(rel) <= 1e-3, (max(rel), rel.index(max(rel)))
    final = load_file(DATA / "peft-lora.final.safetensors")
    for name, t in final.items():
        distance = float((params[name].detach() - t).norm() / t.norm())
        assert distance <= SPREAD_FACTOR * ref["spread"][name] + FLOOR, (name, distance)
