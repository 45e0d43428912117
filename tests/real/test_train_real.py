"""The real tier for training: the pretrained MiniLM with a sequence-classification head and Houlsby adapters,
trained briefly by `surgery train`, exported to ONNX by `surgery export`; ONNX Runtime matches the trained `.pt2`
as `torch.export.load` runs it (nothing of this tool), and the training changed the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.surgery.train_fixtures import write_data

pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]
ATOL, RTOL = 1e-4, 1e-4


def _torch_logits(path, ids, mask) -> np.ndarray:
    program = torch.export.load(str(path))
    with torch.no_grad():
        return program.module()(input_ids=ids, attention_mask=mask)[0].numpy()


def test_minilm_trained_briefly_exports_to_onnx_matching_the_trained_pt2(cli, tmp_path):
    import onnxruntime as ort

    model = tmp_path / "minilm.adapted.pt2"
    run = cli("insert", "minilm", "--task", "sequence-classification", "-o", model)
    assert run.code == 0, run.stderr
    data = write_data("sequence-classification", tmp_path / "train.jsonl", rows=48)
    dev = write_data("sequence-classification", tmp_path / "dev.jsonl", rows=16, seed=1)
    trained = tmp_path / "trained.adapted.pt2"
    run = cli("train", model, "--data", data, "--eval", dev, "-o", trained, "--epochs", "2", "--batch-size", "8",
              "--lr", "1e-3", "--json")  # fmt: skip
    assert run.code == 0, run.stderr
    summary = run.json
    assert summary["losses"][-1] < summary["losses"][0], summary["losses"]
    assert summary["trainable"] == 78_432 + 384 * 2 + 2  # Houlsby r=8 on MiniLM, and the 2-class head
    onnx = tmp_path / "trained.onnx"
    run = cli("export", trained, "-o", onnx)
    assert run.code == 0, run.stderr
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 5000, (3, 21), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 9:] = 0
    want = _torch_logits(trained, ids, mask)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    got = session.run(None, {n: feeds[n] for n in names})[0]
    assert np.abs(got - want).max() <= ATOL + RTOL * np.abs(want).max(), np.abs(got - want).max()
    before = _torch_logits(model, ids, mask)
    assert np.abs(want - before).max() > 10 * (ATOL + RTOL * np.abs(want).max())  # training changed the model
    shown = cli("inspect", trained, "--json")
    assert shown.code == 0 and json.loads(shown.stdout)["training"]["steps"] == summary["steps"]
