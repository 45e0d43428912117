"""`surgery convert` (surgery/gguf_convert.py): a small Llama GGUF with quantized (Q8_0, Q4_0), F16 and F32 tensors
becomes a Hugging Face folder whose safetensors are, tensor by tensor, what transformers' own GGUF load gives (its
dequantization and its q/k un-permutation); shards and index when the model passes the shard size; bad input is one
line and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery import gguf_convert
from surgery.errors import SurgeryError
from surgery.gguf_convert import convert_gguf
from tests.checkpoints import write_gguf

LAYERS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, vocab=300, layers=LAYERS, quantized=True)  # Q8_0, Q4_0, F16, F32, an untied head
    return path


@pytest.fixture(scope="module")
def reference(tiny) -> dict[str, torch.Tensor]:
    """transformers' own load of the GGUF (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def test_the_folder_holds_transformers_own_gguf_tensors(tiny, reference, tmp_path):
    result = convert_gguf(tiny, tmp_path / "hf")
    assert result.dtype == "fp32" and result.shards == 1 and not result.tokenizer
    got = _weights(tmp_path / "hf")
    assert set(got) == set(reference)
    for name, t in reference.items():
        assert torch.equal(got[name], t), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == LAYERS
    from transformers import AutoConfig

    own = AutoConfig.from_pretrained(tiny.parent, gguf_file=tiny.name).to_dict()
    saved = AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    ignore = {"architectures", "dtype", "_name_or_path", "transformers_version"}
    assert {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in own.items() if k not in ignore}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left


def test_shards_chunks_and_dtype(tiny, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "CHUNK", 3000)  # dequantized in row chunks, as large tensors are
    result = convert_gguf(tiny, tmp_path / "hf", dtype="bf16", shard=40_000)
    assert result.shards > 2
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)
    assert index["metadata"]["total_size"] == result.bytes == sum(t.numel() * 2 for t in reference.values())
    got = _weights(tmp_path / "hf")
    for name, t in reference.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16)), name


def test_bad_input_is_one_line_and_leaves_nothing(tiny, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(SurgeryError, match="not a GGUF file"):
        convert_gguf(junk, tmp_path / "a")
    with pytest.raises(SurgeryError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "a")
    with pytest.raises(SurgeryError, match="already exists"):
        convert_gguf(tiny, tmp_path)
    with pytest.raises(SurgeryError, match="--dtype int8"):
        convert_gguf(tiny, tmp_path / "a", dtype="int8")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    with pytest.raises(SurgeryError):
        convert_gguf(truncated, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "junk.gguf"]


@pytest.mark.slow  # two CLI processes: about 20 s here
def test_cli_convert(cli, tiny, tmp_path):
    done = cli("convert", tiny, tmp_path / "hf", "--json")
    assert done.code == 0, done.stderr
    assert done.json["tensors"] == 2 + 9 * LAYERS + 1 and (tmp_path / "hf" / "model.safetensors").is_file()
    again = cli("convert", tiny, tmp_path / "hf")
    assert again.code == 2
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "already exists" in lines[0], again.stderr
