"""Tiny Hugging Face checkpoints written as a trained model arrives: config.json plus safetensors shards (an index
and several files), saved from the causal-LM class so that the tensor names carry its prefix (`model.`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FAMILIES = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=128,
        architectures=["LlamaForCausalLM"],
    ),
    "gpt2": dict(
        model_type="gpt2",
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=128,
        vocab_size=100,
        architectures=["GPT2LMHeadModel"],
    ),  # fmt: skip
}


def write_checkpoint(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A random-weight model of `family` saved in shards of 50 KB; returns the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="50KB")
    return folder


def write_gguf(
    path: Path,
    arch: str = "llama",
    d: int = 64,
    ff: int = 128,
    layers: int = 2,
    vocab: int = 1000,
    quantized: bool = False,
) -> dict[str, np.ndarray]:
    """A small GGUF file as llama.cpp writes one (llama.cpp's names, 4 heads, 2 KV heads); returns the fp32 tensors
    it was made from. Plain: fp32 tensors and the head tied to the embedding. `quantized`: matrices in Q8_0, Q4_0 and
    F16 in turn, norms in F32, and an untied output head."""
    import gguf
    from gguf import GGMLQuantizationType as T

    heads, kv = 4, 2
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    if quantized:
        shapes["output.weight"] = (vocab, d)
    for i in range(layers):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (d,),
                f"blk.{i}.ffn_norm.weight": (d,),
                f"blk.{i}.attn_q.weight": (d, d),
                f"blk.{i}.attn_k.weight": (kv * d // heads, d),
                f"blk.{i}.attn_v.weight": (kv * d // heads, d),
                f"blk.{i}.attn_output.weight": (d, d),
                f"blk.{i}.ffn_gate.weight": (ff, d),
                f"blk.{i}.ffn_up.weight": (ff, d),
                f"blk.{i}.ffn_down.weight": (d, ff),
            }
        )
    kinds = [T.Q8_0, T.Q4_0, T.F16]
    tensors = {}
    for k, (name, shape) in enumerate(shapes.items()):
        if not quantized:
            tensors[name] = t = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            w.add_tensor(name, t)
            continue
        tensors[name] = t = (rng.standard_normal(shape) * 0.05 + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
        kind = T.F32 if len(shape) == 1 else kinds[k % len(kinds)]
        if kind == T.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif kind == T.F32:
            w.add_tensor(name, t)
        else:
            shape_bytes = gguf.quant_shape_to_byte_shape(shape, kind)
            w.add_tensor(name, gguf.quants.quantize(t, kind), raw_shape=shape_bytes, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors checkpoint (its index and shards), by name."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in set(index.values()):
        with safe_open(str(folder / shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
