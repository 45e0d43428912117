"""One small config per Hugging Face family (random weights, 2 layers, width 64): the support matrix's rows
(`tests/surgery/test_matrix.py`), the `small_config` fixture of the fast tier and the causal LMs of `lm_config`
(`CAUSAL_LMS`) build models from this one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=1000,
    max_position_embeddings=256,
)
_GQA = dict(_BASE, num_key_value_heads=2, head_dim=16)
_BART = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    vocab_size=1000,
    max_position_embeddings=256,
)
_SEQ2SEQ = dict(_BART, pad_token_id=1, decoder_start_token_id=2)  # Marian's default pad id is past vocab_size

_AUDIO = dict(  # a front end of three convolutions (stride 20 in all), a convolutional position embedding
    _BASE,
    conv_dim=(32, 32, 32),
    conv_stride=(5, 2, 2),
    conv_kernel=(10, 3, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    vocab_size=32,
)

# One row per family: the model_type and the small config it is built from.
FAMILIES: dict[str, dict[str, Any]] = {
    "bert": _BASE,
    "roberta": _BASE,
    "xlm-roberta": _BASE,
    "distilbert": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000, max_position_embeddings=256),
    "albert": dict(_BASE, embedding_size=32),
    "electra": dict(_BASE, embedding_size=32),
    "deberta-v2": dict(
        _BASE, relative_attention=True, position_buckets=32, max_relative_positions=64, pos_att_type=["p2c", "c2p"]
    ),
    "mpnet": _BASE,
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=256),
    "gpt_neox": dict(_BASE, use_parallel_residual=True, rotary_pct=0.5),
    "gptj": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=1000, n_positions=256),
    "falcon": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        parallel_attn=True,
        new_decoder_architecture=False,
        multi_query=False,
        alibi=False,
        bias=True,
    ),
    "phi": dict(_BASE, partial_rotary_factor=0.5),
    "phi3": dict(_BASE, num_key_value_heads=4, pad_token_id=0),  # q, k, v equal slices of qkv_proj: no GQA
    "llama": _GQA,
    "granite": dict(_GQA, residual_multiplier=0.5),  # residual + out * residual_multiplier
    "mistral": _GQA,
    "mixtral": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),  # routed experts plus a gated shared expert
    "qwen2": _GQA,
    "qwen3": _GQA,
    "gemma2": _GQA,
    "gemma3_text": _GQA,
    "t5": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=1000),
    "bart": _BART,
    # encoder-decoders whose decoder inputs load builds from input_ids by the model's own shift
    "pegasus": _SEQ2SEQ,
    "marian": _SEQ2SEQ,
    "mbart": _SEQ2SEQ,  # its shift wraps the last non-pad token round to the front
    "m2m_100": _SEQ2SEQ,
    # speech: raw audio through a convolutional front end (wav2vec2, HuBERT), log-mel frames (Whisper)
    "wav2vec2": _AUDIO,
    "hubert": _AUDIO,
    "whisper": dict(
        _BART,
        num_mel_bins=16,
        max_source_positions=32,  # input_features of 64 frames
        max_target_positions=256,
        pad_token_id=1,
        bos_token_id=3,
        eos_token_id=4,
        decoder_start_token_id=2,
    ),
    "vit": dict(_BASE, image_size=32, patch_size=8),
    "clip_vision_model": dict(_BASE, image_size=32, patch_size=8),
    "siglip_vision_model": dict(_BASE, image_size=32, patch_size=8),  # an attention-pooling head
}


# The decoder families' causal-LM heads (tests/exporters/test_generate.py): the family's row above, saved as the HF
# class `architectures` names (so the default task is causal-lm), with what generation needs beyond the shape.
# initializer_range 0.2: logits that vary from step to step (at the default 0.02 a tiny random model repeats one
# token, which would prove little about generation).
CAUSAL_LMS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("llama", "LlamaForCausalLM", {}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {}),
    "gemma": ("gemma3_text", "Gemma3ForCausalLM", dict(tie_word_embeddings=False)),
    "gpt2": ("gpt2", "GPT2LMHeadModel", {}),
    # sliding-window attention, windows far below the 256 positions so that short generations cross them
    "mistral": ("mistral", "MistralForCausalLM", dict(sliding_window=8)),  # one window, every layer
    "gemma2": (
        "gemma2",
        "Gemma2ForCausalLM",
        dict(sliding_window=8, tie_word_embeddings=False),
    ),  # local, global (its default layer_types)
    "gemma3": (  # global then local: the other order from Gemma 2's
        "gemma3_text",
        "Gemma3ForCausalLM",
        dict(sliding_window=6, layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=False),
    ),
}
SLIDING_LMS = ("mistral", "gemma2", "gemma3")
LM_INIT = dict(initializer_range=0.2)


def write_config(model_type: str, folder: Path) -> Path:
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **FAMILIES[model_type]).save_pretrained(folder)
    return folder / "config.json"


def write_lm_config(family: str, folder: Path) -> Path:
    """The config.json of the causal LM of `family` (CAUSAL_LMS): its FAMILIES row under its LM class."""
    from transformers import AutoConfig

    model_type, cls, extra = CAUSAL_LMS[family]
    config = AutoConfig.for_model(model_type, **{**FAMILIES[model_type], **LM_INIT, **extra}, architectures=[cls])
    config.save_pretrained(folder)
    return folder / "config.json"
