"""Greedy transcription over a speech recognizer exported as its encoder and decoder pair (`surgery insert --task
automatic-speech-recognition`, then `surgery export`): `Transcriber` runs the encoder once per clip and the decoder
once per token, with its self-attention cache, on ONNX Runtime."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SurgeryError
from .files import check_onnx_data
from .adapted import AdaptedSession
from .generate import Generation
from .packs import Pack, load_pack
from .session import ort_session
from .slots import SlotsMeta


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


TASK = "automatic-speech-recognition"
PACK_FINGERPRINT = "surgery.speech_pack"  # swappable pairs: the fingerprint of a pack of every site of both graphs
META = {
    "task": "surgery.task",
    "start": "surgery.decoder_start_token_id",
    "prefix": "surgery.forced_prefix",
    "eos": "surgery.eos_token_id",
    "max_positions": "surgery.max_positions",
}


@dataclass(frozen=True)
class Decoding:
    """How a speech recognizer's decoder starts and stops: the config's `decoder_start_token_id`, the forced prefix
    after it (`forced_decoder_ids` of the generation config or the config, from position 1 up to the first gap or
    unset token: language, task, no timestamps), `eos_token_id` and `max_target_positions`. The export writes it into
    both graphs' ONNX metadata (`surgery.*`), so the pair transcribes without the model folder."""

    start: int
    prefix: tuple[int, ...] = ()
    eos: tuple[int, ...] = ()
    max_positions: int | None = None

    @property
    def start_tokens(self) -> list[int]:
        return [self.start, *self.prefix]

    @classmethod
    def from_config(cls, config: dict[str, Any], generation: dict[str, Any] | None = None, where: str = "config"):
        """From a config's (and its generation config's) keys; the generation config wins where both have one."""
        both = {**config, **{k: v for k, v in (generation or {}).items() if v is not None}}
        start = both.get("decoder_start_token_id")
        if start is None:
            raise SurgeryError(
                f"{where}: names no decoder_start_token_id (the token the decoder starts from); add it to the config"
            )
        eos = both.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        prefix = []
        for position, token in sorted(both.get("forced_decoder_ids") or (), key=lambda pair: pair[0]):
            if position != len(prefix) + 1 or token is None:
                break
            prefix.append(int(token))
        positions = both.get("max_target_positions")
        return cls(int(start), tuple(prefix), tuple(int(t) for t in eos), None if positions is None else int(positions))

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "prefix": list(self.prefix),
            "eos": list(self.eos),
            "max_positions": self.max_positions,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Decoding:
        positions = d.get("max_positions")
        return cls(
            int(d["start"]),
            tuple(int(t) for t in d.get("prefix", ())),
            tuple(int(t) for t in d.get("eos", ())),
            None if positions is None else int(positions),
        )

    def to_metadata(self) -> dict[str, str]:
        """ONNX `metadata_props`, keys `META`."""
        meta = {"task": TASK, "start": str(self.start), "prefix": json.dumps(list(self.prefix))}
        meta["eos"] = json.dumps(list(self.eos))
        if self.max_positions is not None:
            meta["max_positions"] = str(self.max_positions)
        return {META[k]: v for k, v in meta.items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> Decoding | None:
        """None for a graph exported without it; a damaged entry is a SurgeryError."""
        if meta.get(META["task"]) != TASK or META["start"] not in meta:
            return None
        try:
            positions = meta.get(META["max_positions"])
            return cls(
                int(meta[META["start"]]),
                tuple(int(t) for t in json.loads(meta.get(META["prefix"], "[]"))),
                tuple(int(t) for t in json.loads(meta.get(META["eos"], "[]"))),
                None if positions is None else int(positions),
            )
        except (ValueError, TypeError) as exc:
            raise SurgeryError(
                f"{where}: damaged surgery.* metadata ({exc}); re-export it, or give --config FOLDER"
            ) from exc


def speech_config(folder: str | Path) -> Decoding:
    """The `Decoding` of a model folder's config.json (and generation_config.json beside it), or of the file."""
    path = Path(folder)
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
        generation = path.with_name("generation_config.json")
        extra = json.loads(generation.read_text()) if generation.is_file() else None
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"--config {folder}: cannot read {path} ({exc}); give the model folder or its config.json")
    return Decoding.from_config(config, extra, where=f"--config {path}")


class Transcriber:
    """A greedy loop over a speech recognizer's encoder and decoder graphs (exporters/speech.py):

        t = Transcriber("whisper.decoder.onnx")
        out = t.transcribe(features, max_new_tokens=64)  # start and stop tokens from the graphs' metadata

    `features` are log-mel frames (batch, mel, frames). `decoding` is what the export wrote into the graphs
    (`Decoding`), None for a pair exported without it; `start` and `stop_tokens` given to `transcribe` override it.
    The encoder runs once and gives the cross-attention keys and values of every decoder layer; the decoder's first
    step takes the start tokens (`decoder_start_token_id`, then the forced prefix), each later step one token and the
    cache of the step before. A row stops at a stop token; the loop stops when every row has, or after
    `max_new_tokens`."""

    def __init__(self, model: str | Path, threads: int = 2, max_positions: int | None = None):
        encoder, decoder = speech_pair(model)
        for p in (encoder, decoder):
            check_onnx_data(p)
        self.decoder = ort_session(decoder, threads=threads)
        self.parts: list[AdaptedSession] | None = None
        if SlotsMeta.FINGERPRINT in self.decoder.get_modelmeta().custom_metadata_map:
            # a swappable pair (exporters/speech.py): each graph an AdaptedSession, a pack split between them by site;
            # one session per graph, its own (as the Generator keeps one)
            del self.decoder
            self.parts = [AdaptedSession(p, threads=threads) for p in (encoder, decoder)]
            self.encoder, self.decoder = (p.session for p in self.parts)
        else:
            self.encoder = ort_session(encoder, threads=threads)
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        if "past_key_values.0.key" not in inputs or "cross.0.key" not in inputs:
            raise SurgeryError(f"{decoder}: not a speech decoder with its caches (no past_key_values.0.key input)")
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        _, self.heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.frames = self.encoder.get_inputs()[0].shape[2]
        self.outputs = [o.name for o in self.decoder.get_outputs()]
        self.decoding = Decoding.from_metadata(self.decoder.get_modelmeta().custom_metadata_map, str(decoder))
        self.max_positions = max_positions or (self.decoding.max_positions if self.decoding else None)
        self.where = str(decoder)

    def load(self, name: str, pack: str | Path | Pack) -> None:
        """Make a pack of every site of both graphs (`surgery pack`, or a pack file) available as `name`: each graph
        loads the tensors of its own sites (module paths; the encoder's are under `encoder.`)."""
        if self.parts is None:
            raise SurgeryError(f"{self.where}: a baked pair has no adapter slots; export it with --swappable")
        whole = pack if isinstance(pack, Pack) else load_pack(pack)
        meta = self.decoder.get_modelmeta().custom_metadata_map
        if str(whole.fingerprint) != meta.get(PACK_FINGERPRINT):
            raise SurgeryError(
                f"pack {name!r} was made for another model: its base model, method, activation or sites differ from "
                f"{self.where}'s; make the pack from a model adapted from the same base with the same settings"
            )
        for part in self.parts:
            prefixes = tuple(f"adapters.{site}." for site in part.widths)
            tensors = {n: t for n, t in whole.tensors.items() if n.startswith(prefixes)}
            part.load(name, Pack(tensors, part.fingerprint, whole.meta))

    def transcribe(
        self,
        features: np.ndarray,
        start: list[int] | None = None,
        max_new_tokens: int = 32,
        stop_tokens: list[int] | tuple[int, ...] | None = None,
        keep_logits: bool = False,
        adapter: str | None = None,
    ) -> Generation:
        """Greedy tokens after `start`, per row (up to and including a stop token); `start` and `stop_tokens` default
        to the graphs' `decoding`; `adapter` names a pack `load`ed into a swappable pair (None: its base model)."""
        if adapter is not None and self.parts is None:
            raise SurgeryError(f"{self.where}: a baked pair has no adapter slots; export it with --swappable")
        options = [p.run_options(adapter) for p in self.parts] if self.parts else [None, None]
        if start is None:
            if self.decoding is None:
                raise SurgeryError(
                    f"{self.where}: no start tokens in its metadata (exported before the tool wrote them); "
                    "give them (--config FOLDER), or re-export the model"
                )
            start = self.decoding.start_tokens
        if stop_tokens is None:
            stop_tokens = self.decoding.eos if self.decoding is not None else ()
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
            zip(
                [o.name for o in self.encoder.get_outputs()],
                self.encoder.run(None, {"input_features": features}, options[0]),
            )
        )
        cross = {n: v for n, v in encoded.items() if n.startswith("cross.")}
        empty = np.zeros((B, self.heads, 0, self.head_dim), dtype=np.float32)
        past = {f"past_key_values.{i}.{k}": empty for i in range(self.layers) for k in ("key", "value")}
        ids = np.tile(np.asarray(start, dtype=np.int64), (B, 1))  # (B, len(start))
        stops = [int(t) for t in stop_tokens]
        done = np.zeros(B, dtype=bool)
        for step in range(max_new_tokens):
            result = dict(zip(self.outputs, self.decoder.run(None, {"input_ids": ids, **cross, **past}, options[1])))
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
