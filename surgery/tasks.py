"""Task heads: which Hugging Face class a source is built as, and for a causal LM the KV-cache form it is captured in.

`--task feature-extraction | causal-lm | sequence-classification | token-classification | automatic-speech-recognition`;
the default comes from the config's `architectures` (a folder saved from `LlamaForCausalLM` or `GPT2LMHeadModel` gets
`causal-lm`, one saved from `WhisperForConditionalGeneration` gets `automatic-speech-recognition`: surgery/speech.py).
The task changes the head and the inputs, never the sites: the blocks are the same modules.

A causal LM is captured with its cache, in the layout ONNX Runtime users know from optimum and onnxruntime-genai:

    inputs   input_ids (batch, seq), attention_mask (batch, total), position_ids (batch, seq),
             past_key_values.N.key / .value (batch, kv_heads, past, head_dim)
    outputs  logits (batch, seq, vocab), present.N.key / .value (batch, kv_heads, total, head_dim)

with total = past + seq. One graph serves prefill (past 0) and decode (seq 1). `CausalLMWithPast` wraps the HF model:
it fills a `DynamicCache` from the flat past tensors, builds the 4-D additive mask itself (causal over the last `seq`
of `total` positions, and the 2-D padding mask), and returns the flat present tensors. Its submodules are the HF
model's own (`model`, `lm_head`), so module paths, and so sites, read as in the HF model.

Sliding-window layers (Mistral; Gemma 2 and 3, whose `layer_types` alternate local and global layers) keep the same
full cache: every layer's present holds all `total` positions, and a local layer's mask also hides the keys `window`
or more positions behind the query. The cache stays one shape for every layer, so a runner grows it the same way past
the window, and the graph is the plain ONNX attention that ONNX Runtime runs; a ring buffer would save memory on the
local layers, at the cost of a second cache shape and index arithmetic in every runner.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.signature import Axis, InputSpec, Signature

from surgery.task_names import (  # noqa: F401  the names are data the CLI reads without torch
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    SEQUENCE_CLASSIFICATION,
    SPEECH_RECOGNITION,
    TASK_HELP,
    TASKS,
    TOKEN_CLASSIFICATION,
)

PAST, TOTAL = "past", "total"  # the cache's axes: past positions, and past + seq (the attention mask's length)
SPEECH_FAMILIES = ("whisper",)  # captured by surgery/speech.py
FULL = "full_attention"  # the layer type of a global layer in transformers' `layer_types`


def _mapping(task: str) -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, TASKS[task][1])


def check_task(task: str | None) -> str | None:
    if task is not None and task not in TASKS:
        raise SurgeryError(f"--task {task!r} is not a task this tool captures; choose one of: {', '.join(TASKS)}")
    return task


def default_task(config: Any) -> str:
    """The task a config's `architectures` names (`LlamaForCausalLM` -> causal-lm), else feature-extraction."""
    names = set(getattr(config, "architectures", None) or ())
    for task in (CAUSAL_LM, SPEECH_RECOGNITION, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION):
        if task == SPEECH_RECOGNITION and config.model_type not in SPEECH_FAMILIES:
            continue  # a speech seq2seq head this tool has no step wrapper for (surgery/speech.py)
        classes = _mapping(task).get(config.model_type)
        classes = {classes} if isinstance(classes, str) else set(classes or ())
        if names & classes or any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names if task == CAUSAL_LM):
            return task
    return FEATURE_EXTRACTION


def task_class(config: Any, task: str, fallback: str | None) -> Any:
    """The transformers class of `task` for this config (`fallback`: the table's class for feature extraction)."""
    import transformers

    if task == FEATURE_EXTRACTION:
        return getattr(transformers, fallback) if fallback else transformers.AutoModel
    if config.model_type not in _mapping(task):
        raise SurgeryError(
            f"--task {task}: transformers has no {task} head for model type {config.model_type}; "
            f"use --task {FEATURE_EXTRACTION} (the hidden states), or another task"
        )
    return getattr(transformers, TASKS[task][0])


class CausalLMWithPast(nn.Module):
    """A HF causal LM as a function of flat tensors: (input_ids, attention_mask, position_ids, *past) ->
    (logits, *present), past and present as key, value per layer. See the module docstring."""

    def __init__(self, lm: nn.Module, layers: int, windows: dict[str, int] | None = None):
        super().__init__()
        self.__dict__["lm"] = lm  # not a submodule: its children are ours, so paths read as in the HF model
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.layers = layers
        self.windows = windows or {}  # layer type -> window, for the types that have one (`sliding_windows`)
        params = inspect.signature(lm.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past):
        from transformers import DynamicCache

        seq, total = input_ids.shape[1], attention_mask.shape[1]
        # no config: every layer a full `DynamicLayer` (with the config, sliding layers would crop their cache)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        kv = torch.arange(total, device=input_ids.device)  # (T,)
        q = torch.arange(seq, device=input_ids.device) + (total - seq)  # (S,) positions of the new tokens
        causal = kv[None, :] <= q[:, None]  # (S, T)
        padding = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        dtype = self.lm_head.weight.dtype if hasattr(self, "lm_head") else torch.float32

        def additive(allowed: torch.Tensor) -> torch.Tensor:  # (B, 1, S, T): 0 where allowed, else the dtype's min
            return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

        full = additive(causal[None, None] & padding)
        local = {kind: additive((causal & (q[:, None] - kv[None, :] < w))[None, None] & padding) for kind, w in
                 self.windows.items()}  # fmt: skip
        if FULL in local:  # one window for every layer (Mistral): the model takes one mask
            mask: Any = local[FULL]
        elif local:  # local and global layers (Gemma 2, 3): the model picks a mask per layer by its type
            mask = {FULL: full, **local}
        else:
            mask = full
        with _gqa_in_sdpa():
            out = self.lm(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                return_dict=True,
                **{self.cache_arg: cache},
            )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


@contextmanager
def _gqa_in_sdpa() -> Iterator[None]:
    """transformers repeats the KV heads before SDPA (`repeat_kv`) when there is a mask, unless this switch is on;
    with it, SDPA gets `enable_gqa=True`, which the exporter writes into the ONNX Attention op: no Expand of the whole
    cache per layer and step (the tiny Llama: 5 Expand nodes become 1). The switch is read during the call only."""
    key, old = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def sliding_windows(config: Any, max_pos: int) -> dict[str, int]:
    """The windows of a config's local layers, by layer type: `{"sliding_attention": 512}` where `layer_types` mixes
    local and global layers (Gemma 2, 3), `{"full_attention": 4096}` where every layer has the one window (Mistral),
    `{}` where none has a window shorter than the model's positions (such a window never hides a key)."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= max_pos:
        return {}
    types = set(getattr(config, "layer_types", None) or ())
    if types and types != {FULL, "sliding_attention"} and types != {"sliding_attention"} and types != {FULL}:
        raise SurgeryError(
            f"--task {CAUSAL_LM}: layer types {sorted(types)} in the config; this export masks 'sliding_attention' "
            f"and '{FULL}' layers only; use --task {FEATURE_EXTRACTION}"
        )
    if not types:  # one window for every layer (Mistral's config has no layer_types)
        return {FULL: int(window)}
    if types == {FULL}:
        return {}
    return {"sliding_attention": int(window)}


def with_past(lm: nn.Module) -> tuple[nn.Module, Signature]:
    """`lm` wrapped as `CausalLMWithPast`, and its signature (positional: the cache inputs' names hold dots)."""
    config = lm.config.get_text_config(decoder=True) if hasattr(lm.config, "get_text_config") else lm.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    wrapper = CausalLMWithPast(lm, layers, sliding_windows(config, int(max_pos)))
    wrapper.eval()
    # forward(*past) as named positional parameters, so torch.export sees one input per tensor
    names = [f"past_{i}" for i in range(2 * layers)]
    params = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for n in ("self", "input_ids", "attention_mask", "position_ids", *names)
    ]

    def forward(self: CausalLMWithPast, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return CausalLMWithPast.forward(self, *args)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__class__ = type(CausalLMWithPast.__name__, (CausalLMWithPast,), {"forward": forward})
    batch, seq = Axis("batch", 1, 64), Axis("seq", 1, int(max_pos))
    past = Axis(PAST, 0, int(max_pos))
    total = Axis(TOTAL, 1, 2 * int(max_pos), sum_of=("past", "seq"))
    example_seq, example_past = 5, 3  # neither 0 nor 1: torch.export would specialise them
    inputs = [
        InputSpec("input_ids", (2, example_seq), "int64", {0: batch, 1: seq}, high=config.vocab_size),
        InputSpec("attention_mask", (2, example_seq + example_past), "int64", {0: batch, 1: total}, high=2),
        InputSpec("position_ids", (2, example_seq), "int64", {0: batch, 1: seq}, high=int(max_pos)),
    ]
    outputs = ["logits"]
    # the cache in the model's precision: a bf16 model's attention takes bf16 keys and values only
    cache = str(next((p.dtype for p in lm.parameters() if p.is_floating_point()), torch.float32)).removeprefix("torch.")
    for i in range(layers):
        for kind in ("key", "value"):
            shape = (2, kv_heads, example_past, head_dim)
            inputs.append(InputSpec(f"past_key_values.{i}.{kind}", shape, cache, {0: batch, 2: past}))
            outputs.append(f"present.{i}.{kind}")
    return wrapper, Signature(tuple(inputs), positional=True, outputs=tuple(outputs))


def cache_layout(signature: Signature) -> int | None:
    """The number of layers of a signature in the KV-cache layout (`with_past`), else None."""
    names = signature.names
    if names[:3] != ["input_ids", "attention_mask", "position_ids"] or not any(n.startswith("past_") for n in names):
        return None
    return sum(1 for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
