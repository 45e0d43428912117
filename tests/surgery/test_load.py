"""Load: every kind of source, its signature, and a clear SurgeryError for every bad one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.load import load, sha256_of
from surgery.signature import Axis, parse_input_shape
from tests.checkpoints import write_gguf
from tests.conftest import TinyTransformer


def test_minilm_is_the_default_and_has_text_inputs():
    loaded = load(None)
    assert loaded.source.name == "minilm" and loaded.source.model_type == "bert"
    assert len(loaded.source.sha256) == 64
    ids, mask = loaded.signature.inputs
    assert (ids.name, mask.name) == ("input_ids", "attention_mask")
    assert ids.axes == {0: Axis("batch", 1, 64), 1: Axis("seq", 2, 512)}
    assert ids.high == 30522
    assert loaded.signature.outputs == ("last_hidden_state", "pooler_output")


def test_pt2_signature_is_read_from_the_program(tiny_pt2):
    loaded = load(tiny_pt2)
    assert loaded.program is not None and loaded.manifest is None
    (x,) = loaded.signature.inputs
    assert x.dtype == "float32" and x.shape[2] == 32
    assert [(a.min, a.max) for a in x.axes.values()] == [(1, 64), (2, 256)]
    assert loaded.signature.positional


def test_pickled_module_loads_only_with_trust(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(TinyTransformer(), path)
    with pytest.raises(SurgeryError, match="--trust"):
        load(path)
    with pytest.raises(SurgeryError, match="--input-shape"):
        load(path, trust=True)
    loaded = load(path, trust=True, input_shapes=["batch,seq,32"])
    assert isinstance(loaded.module, TinyTransformer)
    assert loaded.signature.inputs[0].axes[1] == Axis("seq", 2, 4096)


def _text_pt(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    p.write_text("this is not a model\n")
    return p


def _config_without_weights(tmp_path: Path) -> Path:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    return tmp_path


BAD_SOURCES = [
    (lambda t: t / "missing", "no such file or folder"),
    (lambda t: t, "has no config.json"),
    (_text_pt, "not a model file"),
    (_config_without_weights, "no weights"),
]


@pytest.mark.parametrize("make, message", BAD_SOURCES, ids=["missing", "no-config", "text-file", "no-weights"])
def test_bad_sources_are_refused_clearly(tmp_path, make, message):
    with pytest.raises(SurgeryError, match=message):
        load(make(tmp_path))


def test_a_state_dict_is_not_a_module(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(TinyTransformer().state_dict(), path)
    with pytest.raises(SurgeryError, match="not an nn.Module"):
        load(path, trust=True)


@pytest.mark.parametrize("text, message", [("batch,-3", "neither a positive size"), ("seq=5", "MIN:MAX")])
def test_bad_input_shapes(text, message):
    with pytest.raises(SurgeryError, match=message):
        parse_input_shape(text, "x")


def test_input_shape_ranges():
    spec = parse_input_shape("batch,tokens=4:1024,64", "x")
    assert spec.shape == (2, 16, 64)
    assert spec.axes == {0: Axis("batch", 1, 64), 1: Axis("tokens", 4, 1024)}


def test_a_gguf_file_or_a_folder_holding_one_loads_its_weights_in_fp32(tmp_path):
    tensors = write_gguf(tmp_path / "tiny.gguf")
    for source in (tmp_path / "tiny.gguf", tmp_path):
        loaded = load(source)
        assert loaded.source.model_type == "llama" and loaded.module.config.num_hidden_layers == 2
        assert loaded.source.sha256 == sha256_of(tmp_path / "tiny.gguf")
        down = loaded.module.layers[1].mlp.down_proj.weight
        assert down.dtype == torch.float32
        torch.testing.assert_close(down.detach(), torch.from_numpy(tensors["blk.1.ffn_down.weight"]))
        assert [i.name for i in loaded.signature.inputs] == ["input_ids", "attention_mask"]


def test_gguf_files_that_cannot_be_read_are_refused_clearly(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SurgeryError, match="cannot read this GGUF file"):
        load(tmp_path / "junk.gguf")
    write_gguf(tmp_path / "enc.gguf", arch="bert")  # an architecture transformers does not read from GGUF
    with pytest.raises(SurgeryError, match="cannot read this GGUF file"):
        load(tmp_path / "enc.gguf")
    with pytest.raises(SurgeryError, match="2 GGUF files"):
        load(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("task", ["feature-extraction", "causal-lm"])
def test_a_folder_converted_at_load_holds_the_weights_transformers_loads(tmp_path, family, task):
    """bf16 from an fp32 folder of 50 KB shards: read tensor by tensor (not mapped), the same tensors as
    transformers' own from_pretrained."""
    import transformers

    from tests.checkpoints import write_checkpoint

    folder = write_checkpoint(tmp_path / family, family, seed=3)
    cls = transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForCausalLM
    want = cls.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    got = load(str(folder), dtype="bf16", task=task).module.state_dict()
    assert len(want) > 4
    for name, tensor in want.items():
        mine = [v for k, v in got.items() if k == name or k.endswith("." + name)]
        assert len(mine) == 1, name
        assert mine[0].dtype == torch.bfloat16
        torch.testing.assert_close(mine[0], tensor, atol=0, rtol=0)
