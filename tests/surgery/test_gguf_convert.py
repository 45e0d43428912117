"""`surgery convert` (surgery/gguf_convert.py): a small Llama GGUF with quantized (Q8_0, Q4_0), F16 and F32 tensors
becomes a Hugging Face folder whose safetensors are, tensor by tensor, what transformers' own GGUF load gives (its
dequantization and its q/k un-permutation); shards and index when the model passes the shard size; bad input is one
line and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from surgery import gguf_convert
from surgery.errors import SurgeryError
from surgery.gguf_convert import convert_gguf

D, FF, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 300


def write_quantized_gguf(path: Path) -> Path:
    """A Llama GGUF as llama.cpp writes one: q/k permuted by llama.cpp's convention (transformers undoes it),
    matrices in Q8_0, Q4_0 and F16, norms in F32, an untied output head."""
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(D // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    shapes = {"token_embd.weight": (VOCAB, D), "output_norm.weight": (D,), "output.weight": (VOCAB, D)}
    for i in range(LAYERS):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (D,),
                f"blk.{i}.ffn_norm.weight": (D,),
                f"blk.{i}.attn_q.weight": (D, D),
                f"blk.{i}.attn_k.weight": (KV * D // HEADS, D),
                f"blk.{i}.attn_v.weight": (KV * D // HEADS, D),
                f"blk.{i}.attn_output.weight": (D, D),
                f"blk.{i}.ffn_gate.weight": (FF, D),
                f"blk.{i}.ffn_up.weight": (FF, D),
                f"blk.{i}.ffn_down.weight": (D, FF),
            }
        )
    kinds = [T.Q8_0, T.Q4_0, T.F16]
    for k, (name, shape) in enumerate(shapes.items()):
        t = (rng.standard_normal(shape) * 0.05 + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
        kind = T.F32 if len(shape) == 1 else kinds[k % len(kinds)]
        if kind == T.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif kind == T.F32:
            w.add_tensor(name, t)
        else:
            w.add_tensor(
                name,
                gguf.quants.quantize(t, kind),
                raw_shape=gguf.quant_shape_to_byte_shape(shape, kind),
                raw_dtype=kind,
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_quantized_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


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
