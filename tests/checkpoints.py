"""Tiny Hugging Face checkpoints written as a trained model arrives: config.json plus safetensors shards (an index
and several files), saved from the causal-LM class so that the tensor names carry its prefix (`model.`)."""

from __future__ import annotations

from pathlib import Path

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
