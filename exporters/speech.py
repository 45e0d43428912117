"""Baked ONNX of a speech recognizer (`--task automatic-speech-recognition`, surgery/speech.py): the captured step
cut into its encoder and decoder graphs, each exported and checked against its own part of the torch program, and
written as a pair, `NAME.encoder.onnx` and `NAME.decoder.onnx` (both or neither). `runtime.speech.Transcriber` runs
them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.onnx import OnnxExport, export_onnx
from exporters.onnx_files import onnx_files
from surgery.capture import Captured
from surgery.parity import ATOL, RTOL
from surgery.speech import split


def speech_paths(path: str | Path) -> tuple[Path, Path]:
    """NAME.onnx -> (NAME.encoder.onnx, NAME.decoder.onnx)."""
    path = Path(path)
    stem = path.name.removesuffix(".onnx")
    return path.with_name(f"{stem}.encoder.onnx"), path.with_name(f"{stem}.decoder.onnx")


@dataclass(frozen=True)
class SpeechExport:
    """The two graphs written, each with its parity against torch."""

    encoder: OnnxExport
    decoder: OnnxExport

    def to_json(self) -> dict[str, Any]:
        parts = {"encoder": self.encoder.to_json(), "decoder": self.decoder.to_json()}
        worst = max(parts.values(), key=lambda p: p["max_abs_diff"])
        return {
            "onnx": [str(self.encoder.path), str(self.decoder.path)],
            "max_abs_diff": worst["max_abs_diff"],
            "max_rel_diff": max(p["max_rel_diff"] for p in parts.values()),
            "tolerance": worst["tolerance"],
            "rtol": worst["rtol"],
            **parts,
        }


def export_speech(
    captured: Captured, path: str | Path, *, tolerance: float = ATOL, rtol: float = RTOL, external: bool = False
) -> SpeechExport:
    """Split `captured` (surgery/speech.py) and export both graphs beside `path` (`speech_paths`); where the
    decoder's export or check fails, the encoder already written is removed. Both graphs carry the model's
    `Decoding` (start tokens, forced prefix, stop tokens, positions) in their metadata, so the pair transcribes with
    no model folder beside it."""
    (encoder, enc_sig), (decoder, dec_sig) = split(captured.gm, captured.signature)
    enc_path, dec_path = speech_paths(path)
    meta = captured.decoding.to_metadata() if captured.decoding is not None else None
    kw: dict[str, Any] = dict(tolerance=tolerance, rtol=rtol, fuse=False, external=external, metadata=meta)
    enc = export_onnx(encoder, enc_sig, enc_path, **kw)
    try:
        dec = export_onnx(decoder, dec_sig, dec_path, **kw)
    except BaseException:
        for written in onnx_files(enc_path):
            written.unlink(missing_ok=True)
        raise
    return SpeechExport(enc, dec)
