"""Parity of `surgery train` with the anchors' own training: PEFT's LoRA on a tiny Llama and AdapterHub's Houlsby on
MiniLM with a classification head (the references: tests/data/train_parity/make_*_reference.py, whose docstrings
list the settings matched). PEFT: a tiny Llama, the same initial LoRA weights, data order and settings, no
dropout, fp32 on the CPU. Per-step losses agree over 50 steps (the first within 1e-5 relative, every one within
1e-3), and each final LoRA tensor within 10 times the reference's own spread (its 1- vs 2-thread runs) plus 1e-4,
in relative Frobenius distance."""

from __future__ import annotations

import copy
import dataclasses
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
SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "warmup", "max_grad_norm", "seed")


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


@pytest.mark.slow
def test_houlsby_training_matches_adapterhub(tmp_path):
    """MiniLM with transformers' classification head and AdapterHub's Houlsby adapter (DoubleSeqBnConfig, r 8, SiLU)
    as `adapters` initialised it, read by this tool's importer; the reference: make_adapterhub_reference.py."""
    from safetensors.torch import load_file

    from surgery.adapterhub import import_adapterhub

    name = "adapterhub-houlsby"
    ref = json.loads((DATA / f"{name}.json").read_text())
    s = ref["settings"]
    base = open_model("minilm", task="sequence-classification")
    captured = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    spec, report, hub = import_adapterhub(captured, DATA / f"{name}.initial")
    path = tmp_path / f"minilm{SUFFIX}"
    save_adapted(path, captured, spec, report, adapterhub=hub)
    config = TrainConfig(**{k: s[k] for k in SETTINGS}, dropout=False, device="cpu")
    p = prepare(str(path), str(DATA / "cls.jsonl"), None, "seq-cls", {}, config)
    head = load_file(DATA / f"{name}.head.safetensors")
    params = dict(p.model.named_trainable_parameters())
    with torch.no_grad():
        for k in ("weight", "bias"):
            params[f"classifier.{k}"].copy_(head[f"initial.{k}"])
    result = train(p, config, None)
    want = ref["losses"]
    assert len(result.losses) == len(want) >= 50
    rel = [abs(a - b) / abs(b) for a, b in zip(result.losses, want)]
    assert rel[0] <= 1e-5, rel[0]
    assert max(rel) <= 1e-3, (max(rel), rel.index(max(rel)))
    final = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    import_adapterhub(final, DATA / f"{name}.final")
    reference = {n: t for n, t in final.gm.named_parameters() if n.startswith("adapters.")}
    reference.update({f"classifier.{k}": head[f"final.{k}"] for k in ("weight", "bias")})
    assert set(reference) == set(params)
    bound = SPREAD_FACTOR * max(ref["spread"].values()) + FLOOR  # the importer renames: the largest spread
    for n, t in reference.items():
        distance = float((params[n].detach() - t).norm() / t.norm())
        assert distance <= bound, (n, distance)
