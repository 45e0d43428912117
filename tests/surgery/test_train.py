"""Training (surgery/train.py, surgery/adapted.py, surgery/data.py) on tiny random models with a word-level tokenizer:
every task and method learns, the result round-trips with its record, a seed repeats a run bit for bit, an
interrupted run resumes to the same result, dropout switches, and bad input is refused before anything is written."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import surgery
from surgery.adapted import DROPOUT, SDPA
from surgery.adapters import parse_spec
from surgery.bundle import SUFFIX, Dataset, Manifest, Training, save_adapted
from surgery.errors import SurgeryError
from surgery.pipeline import adapt, open_model
from surgery.train import TrainConfig, evaluate, prepare, state_path, train
from tests.surgery.train_fixtures import write_data, write_model

TASKS = ("sequence-classification", "token-classification", "causal-lm")
METHODS = ("houlsby", "pfeiffer", "parallel", "lora")
FAST = dict(epochs=4, batch_size=8, lr=2e-2, warmup=0.0, dropout=False, device="cpu")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`made(task, method)`: the path of a tiny adapted model of `task` (written once), and its data file."""
    cache: dict[tuple[str, str], tuple[str, str]] = {}

    def make(task: str, method: str = "houlsby") -> tuple[str, str]:
        if (task, method) not in cache:
            folder = tmp_path_factory.mktemp(f"{task}-{method}")
            config = write_model(task, folder)
            captured = open_model(str(config))
            spec = parse_spec(method, "4")
            report = adapt(captured, spec, seed=1)
            path = folder / f"model{SUFFIX}"
            save_adapted(path, captured, spec, report)
            cache[task, method] = str(path), str(write_data(task, folder / "train.jsonl"))
        return cache[task, method]

    return make


def _losses_fall(model_path: str, data: str, tmp_path, task: str, **options) -> None:
    config = TrainConfig(**{**FAST, **options})
    p = prepare(model_path, data, data, None, {"prompt": "prompt"} if task == "causal-lm" else {}, config)
    before = evaluate(p, config, p.train.examples)["eval_loss"]
    start = {n: t.detach().clone() for n, t in p.model.named_trainable_parameters()}
    result = train(p, config, None)  # in memory: nothing saved
    after = evaluate(p, config, p.train.examples)["eval_loss"]
    assert result.steps == 16 and len(result.losses) == 16 and result.output is None
    assert after < 0.9 * before, (before, after, result.losses)
    unchanged = [n for n, t in p.model.named_trainable_parameters() if torch.equal(t, start[n])]
    assert not unchanged
    assert result.trainable == sum(p.numel() for p in p.model.trainable_parameters()) > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_sequence_classification(made, tmp_path, method):
    _losses_fall(*made("sequence-classification", method), tmp_path, "sequence-classification")


@pytest.mark.parametrize(
    "task, method", [("token-classification", "houlsby"), ("causal-lm", "lora"), ("causal-lm", "pfeiffer")]
)
def test_every_task_learns(made, tmp_path, task, method):
    _losses_fall(*made(task, method), tmp_path, task)


def test_the_trainable_parameters_are_the_adapters_the_head_and_with_norms_the_norms(made):
    model = surgery.open(made("sequence-classification")[0])
    names = [n for n, _ in model.named_trainable_parameters()]
    assert names and all(n.startswith(("adapters.", "classifier.")) for n in names)
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    assert not any(p.requires_grad for n, p in model.module.named_parameters() if n.startswith("bert."))
    model.set_trainable(head=False, norms=True)
    names = {n for n, _ in model.named_trainable_parameters()}
    assert "classifier.weight" not in names and "bert.embeddings.LayerNorm.weight" in names
    assert all(n.startswith("adapters.") or "LayerNorm" in n for n in names)
    lm = surgery.open(made("causal-lm", "lora")[0])  # a causal LM's head is pretrained: only adapters train
    assert all(n.startswith("adapters.") for n, _ in lm.named_trainable_parameters())


def test_positional_calls_and_dropout_switching(made):
    model = surgery.open(made("sequence-classification")[0])
    ids = torch.randint(5, 30, (3, 9))
    mask = torch.ones_like(ids)
    ref = model.module(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(model.module(ids, mask)[0], ref, rtol=0, atol=0)
    torch.testing.assert_close(model.module(ids)[0], ref, rtol=0, atol=0)  # attention_mask defaults to ones
    with pytest.raises(SurgeryError, match="both by position and by name"):
        model.module(ids, input_ids=ids)
    model.train()
    assert model.module.training
    flags = [n.args[2] for n in model.module.graph.nodes if n.target is DROPOUT]
    assert flags and all(flags)
    sdpa = [n for n in model.module.graph.nodes if n.target is SDPA]
    assert sdpa and all(n.kwargs.get("dropout_p") == 0.1 for n in sdpa)  # BERT's attention_probs_dropout_prob
    torch.manual_seed(0)
    a = model.module(ids, mask)[0]
    b = model.module(ids, mask)[0]
    assert not torch.equal(a, b) and not torch.equal(a, ref)
    model.eval()
    assert not any(n.args[2] for n in model.module.graph.nodes if n.target is DROPOUT)
    assert not any("dropout_p" in n.kwargs for n in model.module.graph.nodes if n.target is SDPA)
    torch.testing.assert_close(model.module(ids, mask)[0], ref, rtol=0, atol=0)


def test_a_trained_model_round_trips_with_its_record(made, tmp_path):
    path, data = made("sequence-classification", "lora")
    config = TrainConfig(**FAST)
    p = prepare(path, data, data, None, {}, config)
    result = train(p, config, tmp_path / "t.adapted.pt2")
    ids = torch.randint(5, 30, (2, 7))
    trained = p.model.module(ids)[0]
    again = surgery.open(tmp_path / "t.adapted.pt2")
    torch.testing.assert_close(again.module(ids)[0], trained, rtol=0, atol=1e-6)
    record = again.manifest.training
    assert record is not None and record.steps == result.steps == 16
    assert record.data.sha256 == p.data.sha256 and record.data.rows == 32
    assert record.hyperparameters["lr"] == 2e-2 and record.labels == ("neg", "pos")
    assert record.metrics["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert Manifest.from_json(json.loads(json.dumps(again.manifest.to_json()))) == again.manifest
    assert not any(n.args[2] for n in again.module.graph.nodes if n.target is DROPOUT)  # exported without dropout
    assert not state_path(tmp_path / "t.adapted.pt2").exists()
    untrained = surgery.open(path)
    assert not torch.allclose(untrained.module(ids)[0], trained)


def test_a_seed_repeats_a_cpu_run_bit_for_bit_with_dropout(made, tmp_path):
    path, data = made("sequence-classification", "houlsby")
    runs = []
    for k, seed in enumerate((3, 3, 4)):
        config = TrainConfig(**{**FAST, "dropout": True, "seed": seed, "epochs": 1})
        p = prepare(path, data, None, None, {}, config)
        result = train(p, config, tmp_path / f"s{k}.adapted.pt2")
        runs.append((result.losses, {n: t.detach().clone() for n, t in p.model.named_trainable_parameters()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    assert runs[0][0] != runs[2][0]


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_result(made, tmp_path):
    path, data = made("sequence-classification", "parallel")
    config = TrainConfig(**{**FAST, "dropout": True, "accumulation": 2, "epochs": 3})
    whole = train(prepare(path, data, data, None, {}, config), config, tmp_path / "whole.adapted.pt2")
    out = tmp_path / "cut.adapted.pt2"

    def stop(step):
        if step.step == 3:
            raise KeyboardInterrupt

    cut = train(prepare(path, data, data, None, {}, config), config, out, on_step=stop)
    assert cut.interrupted and cut.steps == 3 and state_path(out).exists() and not out.exists()
    with pytest.raises(SurgeryError, match="--resume"):
        train(prepare(path, data, data, None, {}, config), config, out)
    other = dataclasses.replace(config, lr=1e-3)
    with pytest.raises(SurgeryError, match="other data, model or settings"):
        train(prepare(path, data, data, None, {}, other), other, out, resume=True)
    resumed = train(prepare(path, data, data, None, {}, config), config, out, resume=True)
    assert resumed.losses == whole.losses and resumed.evals == whole.evals
    assert out.exists() and not state_path(out).exists()


def test_a_new_head_of_more_classes_and_truncation(made, tmp_path):
    path, _ = made("sequence-classification", "houlsby")
    data = tmp_path / "three.jsonl"
    words = "good bad the film " * 100
    data.write_text("".join(json.dumps({"t": words[: 20 * (i + 1)], "y": "abc"[i % 3]}) + "\n" for i in range(12)))
    with pytest.raises(SurgeryError, match="3 labels .* head has 2 classes; give --num-labels 3"):
        prepare(path, str(data), None, None, {"text": "t", "label": "y"}, TrainConfig(**FAST))
    config = TrainConfig(**{**FAST, "num_labels": 3, "max_length": 16})
    p = prepare(path, str(data), None, None, {"text": "t", "label": "y"}, config)
    head = p.model.module.get_parameter("classifier.weight")
    assert head.shape[0] == 3 and p.labels.names == ("a", "b", "c")
    assert torch.equal(p.model.module.get_parameter("classifier.bias"), torch.zeros(3))
    assert abs(float(head.std()) - 0.2) < 0.05  # transformers' init: normal(0, initializer_range), 0.2 here
    result = train(p, config, tmp_path / "three.adapted.pt2")
    assert result.truncated == sum(len(w.split()) + 2 > 16 for w in (words[: 20 * (i + 1)] for i in range(12)))
    assert result.truncated > 0
    assert surgery.open(tmp_path / "three.adapted.pt2").module(torch.tensor([[2, 5, 3]]))[0].shape == (1, 3)


def test_the_training_record_is_validated():
    record = Training(
        task="causal-lm",
        data=Dataset("d.jsonl", "0" * 64, 3),
        steps=2,
        epochs=1.0,
        examples=3,
        trainable=10,
        hyperparameters={"lr": 0.1},
        metrics={"eval_loss": 1.0},
    )
    assert Training.from_json(json.loads(json.dumps(record.to_json()))) == record
    with pytest.raises(SurgeryError, match="negative"):
        dataclasses.replace(record, steps=-1)
    with pytest.raises(SurgeryError, match="not a scalar"):
        dataclasses.replace(record, hyperparameters={"lr": [1]})


@pytest.mark.parametrize(
    "rows, fields, message",
    [
        ([{"sentence": "good film", "label": "pos"}], {}, r"row 1: no field 'text' .*--text-field"),
        ([{"text": "good film"}], {}, r"row 1: no field 'label' .*--label-field"),
        ([{"text": "good", "label": 0}, {"text": "bad", "label": 5}], {}, r"row 2: label 5 is outside the head's 2"),
        ([], {}, "empty, no rows"),
    ],
)
def test_bad_data_is_refused_before_anything_is_written(made, tmp_path, rows, fields, message):
    path, _ = made("sequence-classification")
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SurgeryError, match=message):
        prepare(path, str(data), None, None, fields, TrainConfig(**FAST))


def test_models_without_adapters_are_refused(made, tiny_pt2):
    path, data = made("sequence-classification")
    with pytest.raises(SurgeryError, match=r"\.pt2 without a surgery manifest.*insert adapters first"):
        prepare(str(tiny_pt2), data, None, None, {}, TrainConfig(**FAST))
    with pytest.raises(SurgeryError, match="a model without adapters.*insert adapters first"):
        prepare(path.replace(f"model{SUFFIX}", "config.json"), data, None, None, {}, TrainConfig(**FAST))


def test_jsonl_csv_and_parquet_give_the_same_rows(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from surgery.data import dataset, read_rows

    rows = [{"text": "good film", "label": "pos"}, {"text": 'a, "bad" one', "label": "neg"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("jsonl", "csv", "parquet"):
        assert read_rows(tmp_path / f"d.{suffix}") == rows
    assert dataset(tmp_path / "d.csv", rows).rows == 2
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(SurgeryError, match="give .jsonl, .csv or .parquet"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n[1]\n')
    with pytest.raises(SurgeryError, match="line 2: a list, not an object"):
        read_rows(tmp_path / "bad.jsonl")


def test_to_moves_the_constants_torch_export_lifted(made):
    """`.to(device)` applies a function to every tensor; the graph's dtypes are fixed (it asserts them), and this
    machine may have one device: the function here copies, and every constant must be a copy afterwards."""
    model = surgery.open(made("causal-lm", "lora")[0])
    gm = model.module
    constants = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("lifted_tensor")]
    assert constants  # a Llama's graph holds some: neither parameters nor buffers
    ids = torch.randint(5, 30, (2, 6))
    ref = model.module(ids)[0]
    before = {c: getattr(gm, c) for c in constants}
    gm._apply(lambda t: t.clone())
    assert all(getattr(gm, c) is not before[c] and torch.equal(getattr(gm, c), before[c]) for c in constants)
    torch.testing.assert_close(model.module(ids)[0], ref, rtol=0, atol=0)
