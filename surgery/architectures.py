"""What this tool knows of each Hugging Face model family, as data: one table, one entry per family.

An `Architecture` names, by module path, the sublayer outputs a bottleneck follows (its `roles`: `attn_out`,
`cross_out` in a decoder block, `ffn_out`) and the projections LoRA can sit beside (`lora`: q, k, v, o, ffn_in,
ffn_gate, ffn_out), with the slice of a fused projection's output each stands for (`parts`: GPT-2's `c_attn`
holds q, k and v as three equal slices). Every pattern is a regular expression searched in a module path;
its group 1 is the layer index. The graph rule (sites.py) finds the same sites as the roles on every family
here (tests/surgery/test_sites.py checks it); the table only names them.

`sites` reads it on a captured graph, `count` on a model built on the meta device, and both match paths with
the one function `match`. Adding a family is one entry here and its row in tests/surgery/test_matrix.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import SurgeryError

ATTN_OUT, CROSS_OUT, FFN_OUT = "attn_out", "cross_out", "ffn_out"
LORA_ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_out")


@dataclass(frozen=True)
class Architecture:
    """One model family: where its roles and its LoRA projections are, by module-path regex (group 1 = layer)."""

    roles: dict[str, str]  # attn_out, ffn_out (and cross_out in decoder blocks) -> module-path regex
    lora: dict[str, str]  # q, k, v, o, ffn_in, ffn_gate, ffn_out -> module-path regex of a projection
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)  # LoRA role -> (i, n): i-th of n equal slices
    model_class: str | None = None  # the transformers class built from a config; None: AutoModel
    min_seq: int = 2  # the shortest sequence the captured graph takes (torch.export guards against shorter)
    note: str = ""  # what a user should know (what is captured, what LoRA cannot reach)

    def __post_init__(self) -> None:
        assert set(self.roles) <= {ATTN_OUT, CROSS_OUT, FFN_OUT}, self.roles
        assert set(self.lora) <= set(LORA_ROLES) and set(self.parts) <= set(self.lora), (self.lora, self.parts)


@dataclass(frozen=True)
class Match:
    """A module path that plays a role: its layer index and, on a fused projection, its slice."""

    path: str
    layer: int
    role: str
    part: tuple[int, int] | None = None


def match(
    paths: Iterable[str],
    patterns: dict[str, str],
    roles: Iterable[str],
    parts: dict[str, tuple[int, int]] | None = None,
) -> list[Match]:
    """Every (path, role) whose pattern matches, in path order and, at one path, in `roles` order."""
    compiled = [(role, re.compile(patterns[role])) for role in roles]
    found = []
    for path in paths:
        for role, pattern in compiled:
            if m := pattern.search(path):
                found.append(Match(path, int(m.group(1)) if m.groups() else 0, role, (parts or {}).get(role)))
    return found


def _projections(prefix: str, **names: str) -> dict[str, str]:
    """LoRA patterns `prefix.NAME$` (prefix holding the layer group) for each role=NAME given."""
    return {role: rf"{prefix}\.{name}$" for role, name in names.items()}


_BERT = Architecture(
    roles={ATTN_OUT: r"layer\.(\d+)\.attention\.output\.dense$", FFN_OUT: r"layer\.(\d+)\.output\.dense$"},
    lora={
        **_projections(r"layer\.(\d+)\.attention\.(?:self|attention)", q="query", k="key", v="value"),
        "o": r"layer\.(\d+)\.attention\.output\.dense$",
        "ffn_in": r"layer\.(\d+)\.intermediate\.dense$",
        "ffn_out": r"layer\.(\d+)\.output\.dense$",
    },
)
_LLAMA = Architecture(
    roles={ATTN_OUT: r"layers\.(\d+)\.self_attn\.o_proj$", FFN_OUT: r"layers\.(\d+)\.mlp\.down_proj$"},
    lora={
        **{p: rf"layers\.(\d+)\.self_attn\.{p}_proj$" for p in "qkvo"},
        "ffn_in": r"layers\.(\d+)\.mlp\.up_proj$",
        "ffn_gate": r"layers\.(\d+)\.mlp\.gate_proj$",
        "ffn_out": r"layers\.(\d+)\.mlp\.down_proj$",
    },
)


_CLIP = Architecture(
    roles={ATTN_OUT: r"layers\.(\d+)\.self_attn\.out_proj$", FFN_OUT: r"layers\.(\d+)\.mlp\.fc2$"},
    lora=_projections(
        r"layers\.(\d+)",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        ffn_in="mlp.fc1",
        ffn_out="mlp.fc2",
    ),
)

_BART_ROLES = {
    ATTN_OUT: r"layers\.(\d+)\.self_attn\.out_proj$",
    CROSS_OUT: r"layers\.(\d+)\.encoder_attn\.out_proj$",
    FFN_OUT: r"layers\.(\d+)\.fc2$",
}
_BART_LORA = _projections(
    r"layers\.(\d+)",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    ffn_in="fc1",
    ffn_out="fc2",
)
_WAV2VEC2 = Architecture(
    roles={ATTN_OUT: r"layers\.(\d+)\.attention\.out_proj$", FFN_OUT: r"layers\.(\d+)\.feed_forward\.output_dense$"},
    lora=_projections(
        r"layers\.(\d+)",
        q="attention.q_proj",
        k="attention.k_proj",
        v="attention.v_proj",
        o="attention.out_proj",
        ffn_in="feed_forward.intermediate_dense",
        ffn_out="feed_forward.output_dense",
    ),
    note="input_values: raw audio, dynamic samples; no attention mask, so batches are unpadded",
)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "deberta-v2": Architecture(
        roles=_BERT.roles,
        lora={
            **_BERT.lora,
            **_projections(r"layer\.(\d+)\.attention\.self", q="query_proj", k="key_proj", v="value_proj"),
        },
    ),
    "mpnet": Architecture(
        roles={ATTN_OUT: r"layer\.(\d+)\.attention\.attn\.o$", FFN_OUT: r"layer\.(\d+)\.output\.dense$"},
        lora={
            **_projections(r"layer\.(\d+)\.attention\.attn", q="q", k="k", v="v", o="o"),
            "ffn_in": r"layer\.(\d+)\.intermediate\.dense$",
            "ffn_out": r"layer\.(\d+)\.output\.dense$",
        },
    ),
    "distilbert": Architecture(
        roles={ATTN_OUT: r"layer\.(\d+)\.attention\.out_lin$", FFN_OUT: r"layer\.(\d+)\.ffn\.lin2$"},
        lora=_projections(
            r"layer\.(\d+)",
            q="attention.q_lin",
            k="attention.k_lin",
            v="attention.v_lin",
            o="attention.out_lin",
            ffn_in="ffn.lin1",
            ffn_out="ffn.lin2",
        ),
    ),
    "vit": Architecture(
        roles={ATTN_OUT: r"layers\.(\d+)\.attention\.o_proj$", FFN_OUT: r"layers\.(\d+)\.mlp\.fc2$"},
        lora=_projections(
            r"layers\.(\d+)",
            q="attention.q_proj",
            k="attention.k_proj",
            v="attention.v_proj",
            o="attention.o_proj",
            ffn_in="mlp.fc1",
            ffn_out="mlp.fc2",
        ),
    ),
    "clip_vision_model": _CLIP,
    "siglip_vision_model": _CLIP,  # its attention-pooling head (`head`) takes no adapter by default
    "gpt2": Architecture(
        roles={ATTN_OUT: r"h\.(\d+)\.attn\.c_proj$", FFN_OUT: r"h\.(\d+)\.mlp\.c_proj$"},
        lora={
            **{p: r"h\.(\d+)\.attn\.c_attn$" for p in "qkv"},
            **_projections(r"h\.(\d+)", o="attn.c_proj", ffn_in="mlp.c_fc", ffn_out="mlp.c_proj"),
        },
        parts={p: (i, 3) for i, p in enumerate("qkv")},
    ),
    "gptj": Architecture(  # parallel block: attention and feed-forward outputs added to the residual together
        roles={ATTN_OUT: r"h\.(\d+)\.attn\.out_proj$", FFN_OUT: r"h\.(\d+)\.mlp\.fc_out$"},
        lora=_projections(
            r"h\.(\d+)",
            q="attn.q_proj",
            k="attn.k_proj",
            v="attn.v_proj",
            o="attn.out_proj",
            ffn_in="mlp.fc_in",
            ffn_out="mlp.fc_out",
        ),
    ),
    "gpt_neox": Architecture(  # parallel block (use_parallel_residual)
        roles={ATTN_OUT: r"layers\.(\d+)\.attention\.dense$", FFN_OUT: r"layers\.(\d+)\.mlp\.dense_4h_to_h$"},
        lora=_projections(
            r"layers\.(\d+)", o="attention.dense", ffn_in="mlp.dense_h_to_4h", ffn_out="mlp.dense_4h_to_h"
        ),
        note="q, k, v are interleaved per head in query_key_value: no LoRA on them",
    ),
    "falcon": Architecture(  # parallel block (parallel_attn)
        roles={ATTN_OUT: r"h\.(\d+)\.self_attention\.dense$", FFN_OUT: r"h\.(\d+)\.mlp\.dense_4h_to_h$"},
        lora=_projections(
            r"h\.(\d+)", o="self_attention.dense", ffn_in="mlp.dense_h_to_4h", ffn_out="mlp.dense_4h_to_h"
        ),
        note="q, k, v are interleaved per head in query_key_value: no LoRA on them",
    ),
    "phi": Architecture(  # parallel block
        roles={ATTN_OUT: r"layers\.(\d+)\.self_attn\.dense$", FFN_OUT: r"layers\.(\d+)\.mlp\.fc2$"},
        lora=_projections(
            r"layers\.(\d+)",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.dense",
            ffn_in="mlp.fc1",
            ffn_out="mlp.fc2",
        ),
    ),
    "phi3": Architecture(  # fused qkv_proj (q, k, v) and gate_up_proj (gate, up); q, k, v equal only without GQA
        roles=_LLAMA.roles,
        lora={
            **{p: r"layers\.(\d+)\.self_attn\.qkv_proj$" for p in "qkv"},
            **{p: r"layers\.(\d+)\.mlp\.gate_up_proj$" for p in ("ffn_gate", "ffn_in")},
            **_projections(r"layers\.(\d+)", o="self_attn.o_proj", ffn_out="mlp.down_proj"),
        },
        parts={"q": (0, 3), "k": (1, 3), "v": (2, 3), "ffn_gate": (0, 2), "ffn_in": (1, 2)},
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _LLAMA,  # o_proj -> post_attention_layernorm -> +: the norm sits between the site and the add
    "gemma3_text": _LLAMA,
    "granite": _LLAMA,  # residual + out * residual_multiplier: the site is the unscaled output
    "mixtral": Architecture(  # experts are 3-D parameters combined inside `mlp`: one site after the combination
        roles={ATTN_OUT: _LLAMA.roles[ATTN_OUT], FFN_OUT: r"layers\.(\d+)\.mlp$"},
        lora={p: _LLAMA.lora[p] for p in "qkvo"},
        note="the experts are 3-D parameters, not projections: LoRA on attention only",
    ),
    "t5": Architecture(  # encoder and decoder: a decoder block has three sites
        roles={
            ATTN_OUT: r"block\.(\d+)\.layer\.0\.SelfAttention\.o$",
            CROSS_OUT: r"block\.(\d+)\.layer\.1\.EncDecAttention\.o$",
            FFN_OUT: r"block\.(\d+)\.layer\.\d+\.DenseReluDense\.wo$",
        },
        lora={
            **_projections(r"block\.(\d+)\.layer\.0\.SelfAttention", q="q", k="k", v="v", o="o"),
            "ffn_in": r"block\.(\d+)\.layer\.\d+\.DenseReluDense\.wi$",
            "ffn_out": r"block\.(\d+)\.layer\.\d+\.DenseReluDense\.wo$",
        },
        min_seq=3,
        note="decoder_input_ids are input_ids shifted right",
    ),
    "bart": Architecture(  # encoder and decoder: a decoder block has three sites
        roles=_BART_ROLES,
        lora=_BART_LORA,
        min_seq=3,  # shifting input_ids right into decoder_input_ids needs 3 or more positions under torch.export
        note="decoder_input_ids are input_ids shifted right",
    ),
    "whisper": Architecture(  # BART's layout after a convolutional front end over log-mel frames
        roles=_BART_ROLES,
        lora=_BART_LORA,
        note="input_features are fixed at 2 x max_source_positions frames; decoder_input_ids are given",
    ),
    "wav2vec2": _WAV2VEC2,  # sites in the Transformer encoder after the convolutional front end
    "hubert": _WAV2VEC2,
}
ARCHITECTURES["mt5"] = ARCHITECTURES["t5"]
ARCHITECTURES["qwen2_moe"] = ARCHITECTURES["mixtral"]  # routed experts plus a gated shared expert, one site after
for _seq2seq in ("pegasus", "marian", "mbart", "m2m_100"):  # BART's layout, each with its own shift
    ARCHITECTURES[_seq2seq] = ARCHITECTURES["bart"]

# Built-in shapes, by name, for `surgery count` and the latency harness (random weights: latency and counts do not
# depend on them). GPT-3 175B is a GPT-2 architecture (pre-norm, learned positions, 4·d feed-forward).
BUILTIN: dict[str, dict[str, Any]] = {
    "gpt3-175b": dict(model_type="gpt2", n_layer=96, n_embd=12288, n_head=96, n_positions=2048, vocab_size=50257),
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257),
    "minilm-random": dict(
        model_type="bert",
        num_hidden_layers=6,
        hidden_size=384,
        num_attention_heads=12,
        intermediate_size=1536,
        vocab_size=30522,
        max_position_embeddings=512,
    ),
    # the large-model benchmark's shapes (benchmarks/large.py)
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "llama-559m": dict(
        model_type="llama",
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=18,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=512,
    ),
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


# Model types torch.export cannot capture with a dynamic batch and sequence, with the reason: refused at load, by name.
UNCAPTURABLE: dict[str, str] = {
    "led": "its attention pads the sequence to a multiple of attention_window, a data-dependent size that "
    "torch.export cannot capture with a dynamic sequence",
    "longt5": "its block-local attention cuts the sequence into fixed blocks, which violates the dynamic sequence "
    "dimension torch.export is given",
}


def refuse_uncapturable(model_type: str | None, name: str) -> None:
    """Raise the one-line refusal for a model type of UNCAPTURABLE."""
    reason = UNCAPTURABLE.get(model_type or "")
    if reason is not None:
        raise SurgeryError(
            f"{name}: model type {model_type} cannot be captured: {reason}; capture it yourself with "
            "torch.export at a fixed sequence length and give the .pt2"
        )


def architecture(model_type: str | None) -> Architecture | None:
    """The table's entry for a model type, or None (the graph rule then finds the sites)."""
    return ARCHITECTURES.get(model_type or "")


# Blocks a parallel adapter can span: (projection whose input it takes, projection whose output it adds to, role).
PARALLEL_BLOCKS: dict[str, tuple[str, str, str]] = {"attn": ("q", "o", ATTN_OUT), "ffn": ("ffn_in", "ffn_out", FFN_OUT)}


def lora_architecture(model_type: str | None, what: str, roles: Iterable[str]) -> Architecture:
    """The entry whose projections `what` (LoRA, the parallel adapter) needs, refusing unknown types and roles."""
    arch = architecture(model_type)
    if arch is None:
        known = ", ".join(t for t, a in ARCHITECTURES.items() if a.lora)
        raise SurgeryError(
            f"{what} needs the projections of the architecture, and model type {model_type or 'unknown'} is not in "
            f"the table (known: {known}); use a Houlsby or Pfeiffer adapter with --targets REGEX instead"
        )
    unknown = [r for r in roles if r not in arch.lora]
    if unknown:
        raise SurgeryError(
            f"--targets {','.join(roles)}: {model_type} has no projection {', '.join(unknown)}; "
            f"choose from: {', '.join(arch.lora) or 'none'}" + (f" ({arch.note})" if arch.note else "")
        )
    return arch


def lora_matches(model_type: str | None, paths: Iterable[str], roles: tuple[str, ...]) -> list[Match]:
    """The projections LoRA `roles` sit beside, among module `paths` (in path order)."""
    arch = lora_architecture(model_type, "LoRA", roles)
    return match(paths, arch.lora, roles, arch.parts)


def block_of(path: str) -> str:
    """The Transformer block a module belongs to: its path up to the first layer index (`decoder.layers.0`)."""
    m = re.match(r"(.*?\.\d+)(?:\.|$)", path)
    return m.group(1) if m else ""


def parallel_matches(
    model_type: str | None, paths: Iterable[str], blocks: tuple[str, ...]
) -> list[tuple[Match, Match, str]]:
    """(the projection whose input, the projection whose output, role) of each block a parallel adapter spans,
    per Transformer block (path up to its index) and in layer order."""
    wanted = [r for b in blocks for r in PARALLEL_BLOCKS[b][:2]]
    arch = lora_architecture(model_type, "the parallel adapter", wanted)
    paths = list(paths)
    pairs = []
    for block in blocks:
        first, last, role = PARALLEL_BLOCKS[block]
        firsts: dict[str, Match] = {}
        for m in match(paths, arch.lora, (first,)):
            firsts.setdefault(block_of(m.path), m)
        lasts = match(paths, arch.lora, (last,))
        pairs += [(firsts[block_of(m.path)], m, role) for m in lasts if block_of(m.path) in firsts]
    return sorted(pairs, key=lambda p: p[1].layer)
