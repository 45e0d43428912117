"""Speech recognition (`--task automatic-speech-recognition`): Whisper captured for greedy transcription with its
caches, as one program that `split` cuts into the two graphs onnxruntime-genai's Whisper runs (its split; the tensor
names are this tool's).

The captured program is the whole step, so `insert`, `merge` and the `.adapted.pt2` treat it as any other model:

    inputs   input_features (batch, mel, frames), input_ids (batch, seq),
             past_key_values.N.key / .value (batch, heads, past, head_dim)      the decoder's self-attention cache
    outputs  logits (batch, seq, vocab), present.N.key / .value (batch, heads, past + seq, head_dim),
             encoder_hidden_states (batch, F, d_model), cross.N.key / .value (batch, heads, F, head_dim), F = frames / 2

`split` cuts it where the encoder ends, into

    encoder  input_features -> encoder_hidden_states, cross.N.key / .value       run once per clip
    decoder  input_ids, cross.N.key / .value, past_key_values.N.* -> logits, present.N.*   run once per step

The cross-attention keys and values are computed once, by the decoder layers' own `encoder_attn.k_proj` and `v_proj`
(in the encoder graph); the decoder takes them through an `EncoderDecoderCache` marked as filled, so its
cross-attention reads them instead of projecting the encoder's states again. One decoder graph serves the first step
(the start tokens, past 0) and every later one (one token). The modules are the model's own (`encoder`, `decoder`,
`proj_out`), so the sites are those of the feature-extraction capture, and each adapter lands in the graph that runs
its block.
"""

from __future__ import annotations

import inspect
import torch
from torch import fx, nn

from runtime.speech import Decoding
from surgery.errors import SurgeryError
from surgery.signature import Axis, InputSpec, Signature
from surgery.task_names import SPEECH_RECOGNITION

PAST = "past"
ENCODER_OUT = "encoder_hidden_states"


def cross_names(layers: int) -> list[str]:
    return [f"cross.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class SpeechSeq2SeqWithPast(nn.Module):
    """A HF speech encoder-decoder (`WhisperForConditionalGeneration`) as one step of flat tensors: (input_features,
    input_ids, *past) -> (logits, *present, encoder_hidden_states, *cross). See the module docstring."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["hf"] = model  # not a submodule: its children are ours, so paths read as in WhisperModel
        self.encoder = model.model.encoder
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out
        self.layers = len(self.decoder.layers)

    def forward(self, input_features: torch.Tensor, input_ids: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache, EncoderDecoderCache

        hidden = self.encoder(input_features, return_dict=True).last_hidden_state  # (B, F, D)
        cross = []
        for layer in self.decoder.layers:
            attn = layer.encoder_attn
            shape = (hidden.shape[0], -1, attn.num_heads, attn.head_dim)
            cross.append(attn.k_proj(hidden).view(shape).transpose(1, 2).contiguous())  # (B, H, F, hd)
            cross.append(attn.v_proj(hidden).view(shape).transpose(1, 2).contiguous())
        pairs = lambda t: [(t[2 * i], t[2 * i + 1]) for i in range(self.layers)]  # noqa: E731
        cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=pairs(past)), DynamicCache(ddp_cache_data=pairs(cross)))
        cache.is_updated = {i: True for i in range(self.layers)}  # cross-attention reads `cross`, never projects
        out = self.decoder(
            input_ids=input_ids, encoder_hidden_states=hidden, cache=cache, use_cache=True, return_dict=True
        )
        logits = self.proj_out(out.last_hidden_state)  # (B, S, V)
        present = [t for layer in cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present, hidden, *cross)


def with_caches(model: nn.Module) -> tuple[nn.Module, Signature]:
    """`model` (a `WhisperForConditionalGeneration`) wrapped as `SpeechSeq2SeqWithPast`, and its signature."""
    config = model.config
    if not (hasattr(model, "proj_out") and hasattr(getattr(model, "model", None), "encoder")):
        raise SurgeryError(
            f"--task {SPEECH_RECOGNITION}: {type(model).__name__} is not a Whisper-style speech encoder-decoder "
            "(model.encoder, model.decoder, proj_out); use --task feature-extraction"
        )
    wrapper = SpeechSeq2SeqWithPast(model)
    wrapper.eval()
    layers = wrapper.layers
    names = [f"past_{i}" for i in range(2 * layers)]
    params = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for n in ("self", "input_features", "input_ids", *names)
    ]

    def forward(self: SpeechSeq2SeqWithPast, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return SpeechSeq2SeqWithPast.forward(self, *args)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__class__ = type(SpeechSeq2SeqWithPast.__name__, (SpeechSeq2SeqWithPast,), {"forward": forward})
    max_pos = int(config.max_target_positions)
    frames = 2 * int(config.max_source_positions)  # the encoder refuses any other length
    heads, head_dim = config.decoder_attention_heads, config.d_model // config.decoder_attention_heads
    batch, seq, past = Axis("batch", 1, 64), Axis("seq", 1, max_pos), Axis(PAST, 0, max_pos)
    example_seq, example_past = 5, 3  # neither 0 nor 1: torch.export would specialise them
    inputs = [
        InputSpec("input_features", (2, config.num_mel_bins, frames), "float32", {0: batch}),
        InputSpec("input_ids", (2, example_seq), "int64", {0: batch, 1: seq}, high=config.vocab_size),
    ]
    for name in cache_names(layers, "past_key_values"):
        inputs.append(InputSpec(name, (2, heads, example_past, head_dim), "float32", {0: batch, 2: past}))
    outputs = ["logits", *cache_names(layers, "present"), ENCODER_OUT, *cross_names(layers)]
    return wrapper, Signature(tuple(inputs), positional=True, outputs=tuple(outputs))


def speech_layout(signature: Signature) -> int | None:
    """The decoder's layers of a signature in `with_caches`' layout, else None."""
    if signature.names[:2] != ["input_features", "input_ids"] or ENCODER_OUT not in signature.outputs:
        return None
    return sum(1 for n in signature.names if n.startswith("past_key_values.") and n.endswith(".key"))


def split(gm: fx.GraphModule, signature: Signature) -> tuple[tuple[fx.GraphModule, Signature], ...]:
    """The captured step cut into (encoder, its signature) and (decoder, its signature): new GraphModules over the
    same parameters and adapter modules (nothing is copied). The decoder takes the encoder's outputs as inputs of
    the same names; a decoder node that still needs `input_features` means the cut is wrong, and is refused."""
    layers = speech_layout(signature)
    if layers is None:
        raise SurgeryError(f"split: not a {SPEECH_RECOGNITION} program (inputs {signature.names[:2]})")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    (out_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    results = dict(zip(signature.outputs, out_node.args[0]))
    inputs = dict(zip(signature.names, placeholders))
    encoder_out = [ENCODER_OUT, *cross_names(layers)]
    decoder_in = ["input_ids", *cross_names(layers), *cache_names(layers, "past_key_values")]
    decoder_out = ["logits", *cache_names(layers, "present")]
    encoder = _part(gm, {"input_features": inputs["input_features"]}, [results[n] for n in encoder_out], "encoder")
    cut = {n: inputs[n] if n in inputs else results[n] for n in decoder_in}
    decoder = _part(gm, cut, [results[n] for n in decoder_out], "decoder")

    specs = {s.name: s for s in signature.inputs}
    batch = specs["input_ids"].axes[0]
    frames = specs["input_features"].shape[2] // 2
    heads, head_dim = specs["past_key_values.0.key"].shape[1], specs["past_key_values.0.key"].shape[3]
    cross = [InputSpec(n, (2, heads, frames, head_dim), "float32", {0: batch}) for n in cross_names(layers)]
    dec_inputs = (specs["input_ids"], *cross, *(specs[n] for n in cache_names(layers, "past_key_values")))
    return (
        (encoder, Signature((specs["input_features"],), positional=True, outputs=tuple(encoder_out))),
        (decoder, Signature(dec_inputs, positional=True, outputs=tuple(decoder_out))),
    )


def _part(gm: fx.GraphModule, inputs: dict[str, fx.Node], outputs: list[fx.Node], what: str) -> fx.GraphModule:
    """The nodes of `gm` that `outputs` need, as a GraphModule whose placeholders are `inputs` (name -> the node
    it stands for: a placeholder of `gm`, or any node where the graph is cut)."""
    stands = {node: name for name, node in inputs.items()}
    needed: set[fx.Node] = set()
    sizes: dict[fx.Node, tuple[fx.Node, int]] = {}
    todo = list(outputs)
    while todo:
        node = todo.pop()
        if node in needed:
            continue
        needed.add(node)
        if node in stands:
            continue
        if node.target is torch.ops.aten.sym_size.int and node.args[0] not in stands:
            sizes[node] = _same_size(node, stands)  # the batch size read from an input of the other graph
            continue
        if node.op == "placeholder":
            raise SurgeryError(
                f"split: the {what} graph needs the input {node.name} of the other one ({node.format_node()})"
            )
        todo.extend(node.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name, node in inputs.items():
        env[node] = graph.placeholder(name.replace(".", "_"))
        env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node in sizes:
            source, dim = sizes[node]
            env[node] = graph.call_function(torch.ops.aten.sym_size.int, (env[source], dim))
            env[node].meta = dict(node.meta)
        elif node in needed and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    part = fx.GraphModule(gm, graph)
    part.graph.lint()
    part.recompile()
    return part


def _same_size(node: fx.Node, inputs: dict[fx.Node, str]) -> tuple[fx.Node, int]:
    """For a `sym_size` node that reads an input of the other graph: an input of this one, and its axis, of the
    same symbolic size (torch.export reads a shared axis, such as the batch, from whichever input it met first)."""
    want = str(node.meta.get("val"))
    for source in inputs:
        shape = getattr(source.meta.get("val"), "shape", ())
        for dim, size in enumerate(shape):
            if str(size) == want:
                return source, dim
    raise SurgeryError(f"split: no input of this graph has the size {want} that {node.format_node()} reads")


def decoding_of(model: nn.Module) -> Decoding:
    """How `model` (a `WhisperForConditionalGeneration`) starts and stops decoding: from its config and generation
    config (runtime/speech.py's `Decoding`, written into the exported graphs)."""
    config = model.config.to_dict()
    generation = getattr(model, "generation_config", None)
    extra = generation.to_dict() if generation is not None else None
    return Decoding.from_config(config, extra, where=f"{type(model).__name__} config")


def is_speech_source(source: str | None, task: str | None) -> bool:
    """Whether `source` (a Hugging Face folder or a `.pt2`) would be opened as a speech recognizer, read cheaply
    (the archive's manifest, the folder's config) before anything is captured: `--task`, else the `.pt2`'s task,
    else the config's default (tasks.py)."""
    import json
    import zipfile
    from pathlib import Path

    if task is not None or source is None:
        return task == SPEECH_RECOGNITION
    path = Path(source)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/extra/surgery.json")]
            try:
                manifest = json.loads(zf.read(names[0])) if names else {}
            except ValueError:
                return False  # a damaged manifest is refused where the archive is opened
        return isinstance(manifest, dict) and manifest.get("task") == SPEECH_RECOGNITION
    folder = path if path.is_dir() else path.parent if path.name == "config.json" else None
    if folder is None or not (folder / "config.json").is_file():
        return False
    from transformers import AutoConfig

    from surgery.tasks import default_task

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return False  # an unreadable config is refused where the model is loaded
    return default_task(config) == SPEECH_RECOGNITION
