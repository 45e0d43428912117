"""Greedy transcription over a speech recognizer exported as its encoder and decoder pair (`surgery insert --task
automatic-speech-recognition`, then `surgery export`): `Transcriber` runs the encoder once per clip and the decoder
once per token, with its self-attention cache, on ONNX Runtime."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import SurgeryError
from .files import check_onnx_data
from .generate import Generation
from .session import ort_session


def speech_pair(path: str | Path) -> tuple[Path, Path]:
    """The (encoder, decoder) files from either of them, or from the NAME.onnx the export was given."""
    path = Path(path)
    stem = path.name.removesuffix(".onnx").removesuffix(".encoder").removesuffix(".decoder")
    pair = path.with_name(f"{stem}.encoder.onnx"), path.with_name(f"{stem}.decoder.onnx")
    for p in pair:
        if not p.is_file():
            raise SurgeryError(
                f"{path}: no {p.name} beside it; a speech recognizer is the pair NAME.encoder.onnx and "
                "NAME.decoder.onnx that `surgery export` writes for --task automatic-speech-recognition"
            )
    return pair


def speech_config(folder: str | Path) -> tuple[list[int], list[int], int | None]:
    """(start tokens, stop tokens, the decoder's positions) from a model folder's config.json (or the file):
    `decoder_start_token_id`, `eos_token_id`, `max_target_positions`."""
    path = Path(folder)
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"--config {folder}: cannot read {path} ({exc}); give the model folder or its config.json")
    start = config.get("decoder_start_token_id")
    if start is None:
        raise SurgeryError(f"--config {path}: no decoder_start_token_id; give the start tokens with --prefix-token")
    eos = config.get("eos_token_id")
    stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [int(start)], [int(t) for t in stops], config.get("max_target_positions")


class Transcriber:
    """A greedy loop over a speech recognizer's encoder and decoder graphs (exporters/speech.py):

        t = Transcriber("whisper.decoder.onnx")
        out = t.transcribe(features, start=[50258], stop_tokens=[50257], max_new_tokens=64)

    `features` are log-mel frames (batch, mel, frames). The encoder runs once and gives the cross-attention keys
    and values of every decoder layer; the decoder's first step takes the start tokens (the config's
    `decoder_start_token_id`, then any forced prefix the caller gives), each later step one token and the cache of
    the step before. A row stops at a stop token; the loop stops when every row has, or after `max_new_tokens`."""

    def __init__(self, model: str | Path, threads: int = 2, max_positions: int | None = None):
        encoder, decoder = speech_pair(model)
        for p in (encoder, decoder):
            check_onnx_data(p)
        self.encoder = ort_session(encoder, threads=threads)
        self.decoder = ort_session(decoder, threads=threads)
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        if "past_key_values.0.key" not in inputs or "cross.0.key" not in inputs:
            raise SurgeryError(f"{decoder}: not a speech decoder with its caches (no past_key_values.0.key input)")
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        _, self.heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.frames = self.encoder.get_inputs()[0].shape[2]
        self.outputs = [o.name for o in self.decoder.get_outputs()]
        self.max_positions = max_positions
        self.where = str(decoder)

    def transcribe(
        self,
        features: np.ndarray,
        start: list[int],
        max_new_tokens: int = 32,
        stop_tokens: list[int] | tuple[int, ...] = (),
        keep_logits: bool = False,
    ) -> Generation:
        """Greedy tokens after `start`, per row (up to and including a stop token)."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 3 or features.shape[2] != self.frames:
            raise SurgeryError(
                f"features of shape {features.shape}: this encoder takes (batch, mel, {self.frames}) log-mel frames"
            )
        if not start:
            raise SurgeryError("transcribe: give at least one start token (the config's decoder_start_token_id)")
        if self.max_positions is not None:
            max_new_tokens = min(max_new_tokens, self.max_positions - len(start))
        B = features.shape[0]
        out = Generation(tokens=[[] for _ in range(B)])
        if max_new_tokens <= 0:
            return out
        begin = time.perf_counter()
        encoded = dict(
            zip([o.name for o in self.encoder.get_outputs()], self.encoder.run(None, {"input_features": features}))
        )
        cross = {n: v for n, v in encoded.items() if n.startswith("cross.")}
        empty = np.zeros((B, self.heads, 0, self.head_dim), dtype=np.float32)
        past = {f"past_key_values.{i}.{k}": empty for i in range(self.layers) for k in ("key", "value")}
        ids = np.tile(np.asarray(start, dtype=np.int64), (B, 1))  # (B, len(start))
        stops = [int(t) for t in stop_tokens]
        done = np.zeros(B, dtype=bool)
        for step in range(max_new_tokens):
            result = dict(zip(self.outputs, self.decoder.run(None, {"input_ids": ids, **cross, **past})))
            logits = result["logits"][:, -1, :]  # (B, V)
            token = np.where(done, 0, logits.argmax(-1)).astype(np.int64)
            if keep_logits:
                out.logits.append(logits.copy())
            for b in np.flatnonzero(~done):
                out.tokens[b].append(int(token[b]))
            done |= np.isin(token, stops) if stops else False
            past = {n.replace("present.", "past_key_values.", 1): v for n, v in result.items() if n != "logits"}
            ids = token[:, None]
            now = time.perf_counter()
            out.count_step(now - begin)  # the first step's time includes the encoder's
            begin = now
            if done.all():
                break
        return out
