"""Task heads (`--task`): the default from the config's `architectures`, the manifest's record of it, and sites
and counts that do not depend on the head."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from surgery.adapters import AdapterSpec
from surgery.bundle import Manifest
from surgery.errors import SurgeryError
from surgery.pipeline import adapt, open_model
from surgery.tasks import default_task

OLD = Path(__file__).resolve().parents[1] / "data" / "manifests"


@pytest.mark.parametrize(
    "model_type, architectures, task",
    [
        ("llama", ["LlamaForCausalLM"], "causal-lm"),
        ("gpt2", ["GPT2LMHeadModel"], "causal-lm"),
        ("qwen2", ["Qwen2ForCausalLM"], "causal-lm"),
        ("bert", ["BertForSequenceClassification"], "sequence-classification"),
        ("bert", ["BertForTokenClassification"], "token-classification"),
        ("bert", ["BertModel"], "feature-extraction"),
        ("whisper", ["WhisperForConditionalGeneration"], "automatic-speech-recognition"),
        ("whisper", ["WhisperModel"], "feature-extraction"),
        ("speech_to_text", ["Speech2TextForConditionalGeneration"], "feature-extraction"),  # no step wrapper for it
        ("llama", None, "feature-extraction"),
    ],
)
def test_default_task_from_architectures(model_type, architectures, task):
    from transformers import AutoConfig

    assert default_task(AutoConfig.for_model(model_type, architectures=architectures)) == task


@pytest.mark.parametrize("name", sorted(p.name for p in OLD.glob("*.json")))
def test_manifests_written_before_tasks_read_as_feature_extraction(name):
    old = json.loads((OLD / name).read_text())
    assert "task" not in old
    manifest = Manifest.from_json(old)
    assert manifest.task == "feature-extraction"
    assert Manifest.from_json(manifest.to_json()) == manifest
    causal = dataclasses.replace(manifest, task="causal-lm")
    assert Manifest.from_json(json.loads(json.dumps(causal.to_json()))).task == "causal-lm"
    with pytest.raises(SurgeryError, match="task 'chat' is none of"):
        dataclasses.replace(manifest, task="chat")


def test_unknown_task_and_missing_head_are_one_line_errors(small_config):
    with pytest.raises(SurgeryError, match="--task 'chat' is not a task"):
        open_model(str(small_config("t5")), task="chat")
    with pytest.raises(SurgeryError, match="no causal-lm head for model type t5"):
        open_model(str(small_config("t5")), task="causal-lm")


@pytest.mark.slow
def test_causal_lm_keeps_sites_and_counts_and_records_its_task(lm_base, lm_config, tmp_path):
    import copy

    from surgery.bundle import save_adapted

    config = str(lm_config("llama"))
    hidden = open_model(config, task="feature-extraction")
    causal = dataclasses.replace(lm_base("llama"), gm=copy.deepcopy(lm_base("llama").gm))  # the default task
    assert (hidden.task, causal.task) == ("feature-extraction", "causal-lm")
    assert causal.signature.outputs[:3] == ("logits", "present.0.key", "present.0.value")
    spec = AdapterSpec("houlsby", r=4)
    a, b = adapt(hidden, spec), adapt(causal, spec)
    assert [f"model.{s.path}" for s in a.sites] == [s.path for s in b.sites]  # the CausalLM holds the model as .model
    assert [s.role for s in a.sites] == [s.role for s in b.sites] and a.trainable == b.trainable == 2320
    manifest = save_adapted(tmp_path / "c.adapted.pt2", causal, spec, b)
    reopened = open_model(str(tmp_path / "c.adapted.pt2"))
    assert manifest.task == reopened.task == reopened.manifest.task == "causal-lm"
    with pytest.raises(SurgeryError, match="captured as causal-lm, not feature-extraction"):
        open_model(str(tmp_path / "c.adapted.pt2"), task="feature-extraction")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_classification_heads_keep_sites_and_counts(task, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(
        "bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=500
    ).save_pretrained(tmp_path)
    hidden = open_model(str(tmp_path / "config.json"))
    head = open_model(str(tmp_path / "config.json"), task=task)
    assert head.task == task and head.signature.outputs == ("logits",)
    spec = AdapterSpec("houlsby", r=4)
    a, b = adapt(hidden, spec), adapt(head, spec)
    assert [f"bert.{s.path}" for s in a.sites] == [s.path for s in b.sites] and a.trainable == b.trainable
    tensors = head.signature.examples()
    with torch.no_grad():
        logits = head.signature.call(head.gm, tensors)[0]
    assert logits.shape[-1] == 2 and logits.dim() == (2 if task == "sequence-classification" else 3)


@pytest.mark.slow
def test_a_bf16_causal_lm_takes_its_cache_in_bf16_and_exports(lm_config, tmp_path):
    """The cache inputs in the model's precision (a bf16 model's attention refuses fp32 keys); the bf16 export, run
    as its fp32 copy on the CPU, within the bf16 tolerances of torch."""
    from exporters.onnx import export_onnx
    from surgery.adapters import stand_in_weights
    from surgery.parity import tolerances

    captured = open_model(str(lm_config("llama")), dtype="bf16")
    past = [i for i in captured.signature.inputs if i.name.startswith("past_key_values.")]
    assert past and {i.dtype for i in past} == {"bfloat16"}
    adapt(captured, AdapterSpec("houlsby", r=4))
    stand_in_weights(captured.gm, seed=2)
    atol, rtol = tolerances(torch.bfloat16)
    result = export_onnx(captured.gm, captured.signature, tmp_path / "lm.onnx", tolerance=atol, rtol=rtol)
    assert result.parity.ok and "present.0.key" in result.parity.outputs
