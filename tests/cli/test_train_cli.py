"""`surgery train` as a subprocess: a run and its JSON summary, the record `inspect` shows, the other commands
taking the output unchanged, and bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from surgery.adapters import parse_spec
from surgery.bundle import SUFFIX, save_adapted
from surgery.pipeline import adapt, open_model
from tests.surgery.train_fixtures import write_data, write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny BERT for sequence classification with Houlsby adapters (its folder holds its tokenizer, and the same
    model with LoRA as lora.adapted.pt2), its data, and a plain .pt2 of the same base without a manifest."""
    import torch

    folder = tmp_path_factory.mktemp("train-cli")
    captured = open_model(str(write_model("sequence-classification", folder)))
    plain = folder / "plain.pt2"
    from surgery.capture import export_program

    torch.export.save(export_program(captured.gm, captured.signature, "plain"), plain)
    base = copy.deepcopy(captured.gm)
    for method in ("lora", "houlsby"):
        captured.gm = copy.deepcopy(base)
        spec = parse_spec(method, "4")
        save_adapted(folder / f"{method}{SUFFIX}", captured, spec, adapt(captured, spec, seed=1))
    return folder / f"houlsby{SUFFIX}", write_data("sequence-classification", folder / "train.jsonl"), plain


def _no_output(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith("out")]
    assert not left, left


def test_train_writes_a_model_whose_record_inspect_shows(tiny, cli, tmp_path):
    model, data, _ = tiny
    out = tmp_path / "out.adapted.pt2"
    run = cli("train", model, "--data", data, "--eval", data, "--task", "seq-cls", "-o", out, "--epochs", "2",
              "--lr", "2e-2", "--batch-size", "8", "--seed", "1", "--json")  # fmt: skip
    assert run.code == 0, run.stderr
    summary = run.json
    assert summary["steps"] == 8 and summary["examples"] == 64 and summary["output"] == str(out)
    assert summary["best_epoch"] in (0, 1) and 0 <= summary["metrics"]["eval_accuracy"] <= 1
    assert summary["trainable"] > 0 and 0 < summary["share"] < 0.1 and summary["examples_per_s"] > 0
    assert summary["labels"] == ["neg", "pos"] and summary["truncated"] == 0
    shown = cli("inspect", out, "--json")
    assert shown.code == 0, shown.stderr
    record = shown.json["training"]
    assert record["steps"] == 8 and record["data"]["rows"] == 32 and record["hyperparameters"]["seed"] == 1
    assert record["metrics"]["eval_accuracy"] == summary["metrics"]["eval_accuracy"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = cli("train", model, "--data", empty, "-o", tmp_path / "out2.adapted.pt2")
    assert bad.code == 2 and "empty, no rows" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out2.adapted.pt2").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "rows, model, message",
    [
        ([{"sentence": "good film", "label": "pos"}], "model", "no field 'text'"),
        ([{"text": "good", "label": 0}, {"text": "bad", "label": 7}], "model", "outside the head's 2 classes"),
        ([{"text": "good", "label": "pos"}], "plain", ".pt2 without a surgery manifest"),
        ([{"text": "good", "label": "pos"}], "config", "a model without adapters"),
        ([], "model", "empty, no rows"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tiny, cli, tmp_path, rows, model, message):
    models = {"model": tiny[0], "plain": tiny[2], "config": tiny[0].parent / "config.json"}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = cli("train", models[model], "--data", data, "-o", tmp_path / "out.adapted.pt2")
    assert run.code == 2, run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    _no_output(tmp_path)


@pytest.mark.slow
def test_export_pack_and_merge_take_a_trained_model(tiny, cli, tmp_path):
    model, data, _ = tiny
    for method, commands in (("houlsby", ("export", "pack")), ("lora", ("merge",))):
        out = tmp_path / f"{method}.adapted.pt2"
        run = cli("train", model.with_name(f"{method}{SUFFIX}"), "--data", data, "-o", out, "--epochs", "1")
        assert run.code == 0, run.stderr
        outputs = {"export": "m.onnx", "pack": "m.safetensors", "merge": "merged.adapted.pt2"}
        for command in commands:
            done = cli(command, out, "-o", tmp_path / outputs[command])
            assert done.code == 0, (command, done.stderr)
            assert (tmp_path / outputs[command]).exists()
