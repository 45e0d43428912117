"""`surgery generate`: text from an ONNX causal LM exported with its KV cache, streamed as it comes; or, with
`--features`, the greedy tokens of a speech recognizer's encoder and decoder pair."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from cli.common import emit_json, err, out, step
from cli.options import Json
from runtime.errors import SurgeryError
from runtime.generate import Generator
from runtime.tokenizer import TextTokenizer


def generate(
    model: Annotated[
        str,
        typer.Argument(
            help="An ONNX causal LM exported with --task causal-lm (baked or swappable), or with --features a speech "
            "recognizer's NAME.decoder.onnx."
        ),
    ],
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The text to continue.")] = None,
    features: Annotated[
        Optional[str],
        typer.Option("--features", help="A speech recognizer's input: log-mel frames (batch, mel, frames) as .npy."),
    ] = None,
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            help="With --features: the model folder (or config.json) giving the start and stop tokens, instead of "
            "the graphs' metadata.",
        ),
    ] = None,
    prefix_token: Annotated[
        Optional[list[int]],
        typer.Option(
            "--prefix-token",
            help="With --features: a token forced after the start tokens (repeatable).",
        ),
    ] = None,
    tokenizer: Annotated[
        Optional[str], typer.Option("--tokenizer", help="The model folder holding tokenizer.json (or a GGUF file).")
    ] = None,
    adapter: Annotated[
        Optional[str], typer.Option("--adapter", help="A pack (.onnx_adapter or .safetensors) for a swappable export.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="At most this many new tokens.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; above 0: sampling.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Sample among the most likely tokens up to this mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the sampling.")] = None,
    stop_token: Annotated[
        Optional[list[int]], typer.Option("--stop-token", help="A token id that ends the text (the folder's EOS too).")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime intra-op threads.")] = 2,
    json: Json = False,
) -> None:
    """Generate text from a prompt (greedy or sampled), printing it as it streams; reports time to first token
    and decode tokens/s."""
    if max_new_tokens < 1:
        raise SurgeryError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    if features is not None:
        return _transcribe(
            model, features, config, prefix_token or [], stop_token or [], max_new_tokens, threads, json, adapter
        )
    if prompt is None:
        raise SurgeryError("--prompt TEXT is missing (or --features FILE.npy for a speech recognizer)")
    if tokenizer is None:
        raise SurgeryError("--tokenizer FOLDER is missing: the model folder whose tokenizer.json encodes the prompt")
    tok = TextTokenizer.from_folder(tokenizer)
    with step(f"load {model}"):
        gen = Generator(model, threads=threads)
        if adapter is not None:
            gen.load("adapter", adapter)
    ids = tok.encode(prompt)
    shown = [""]
    new: list[int] = []

    def stream(_: int, tokens) -> None:
        new.append(int(tokens[0]))
        text = tok.decode(new)
        if not json:
            out.print(text[len(shown[0]) :], end="", soft_wrap=True, markup=False, highlight=False)
        shown[0] = text

    start = time.perf_counter()
    result = gen.generate(
        [ids],
        max_new_tokens,
        adapter="adapter" if adapter else None,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_tokens=(*tok.stop, *(stop_token or ())),
        on_token=stream,
    )
    total = time.perf_counter() - start
    if json:
        emit_json({"prompt_tokens": len(ids), "text": shown[0], "seconds": round(total, 3), **result.to_json()})
        return
    out.print()
    err.print(
        f"[dim]{len(ids)} prompt tokens, {result.steps} new; time to first token {result.ttft_s * 1e3:.1f} ms, "
        f"decode {result.tokens_per_s:.1f} tokens/s[/]"
    )


def _transcribe(model, features, config, prefix, stops, max_new_tokens, threads, json, adapter=None) -> None:
    """Greedy tokens from log-mel frames (runtime/speech.py), one line of ids per row. The start and stop tokens come
    from the graphs' metadata, or from --config where it is given."""
    import numpy as np

    from runtime.speech import Transcriber, speech_config

    decoding = speech_config(config) if config is not None else None
    try:
        frames = np.load(features)
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"--features {features}: not a .npy array ({exc}); save the frames with numpy.save")
    if frames.ndim == 2:  # one clip (mel, frames)
        frames = frames[None]
    with step(f"load {model}"):
        transcriber = Transcriber(model, threads=threads, max_positions=decoding.max_positions if decoding else None)
        if adapter is not None:
            transcriber.load("adapter", adapter)
    decoding = decoding or transcriber.decoding
    if decoding is None:
        raise SurgeryError(
            f"{model}: its metadata names no start token (exported by an earlier version); give --config FOLDER, "
            "the model folder whose config.json names it, or re-export the model"
        )
    start = [*decoding.start_tokens, *prefix]
    start_s = time.perf_counter()
    result = transcriber.transcribe(
        frames, start, max_new_tokens, stop_tokens=[*decoding.eos, *stops], adapter="adapter" if adapter else None
    )
    total = time.perf_counter() - start_s
    if json:
        emit_json({"start_tokens": start, "seconds": round(total, 3), **result.to_json()})
        return
    for row in result.tokens:
        out.print(" ".join(map(str, row)))
    err.print(
        f"[dim]{len(result.tokens)} clips, {result.steps} steps; encoder and first token {result.ttft_s * 1e3:.1f} "
        f"ms, decode {result.tokens_per_s:.1f} tokens/s[/]"
    )
