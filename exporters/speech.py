"""Baked ONNX of a speech recognizer (`--task automatic-speech-recognition`, surgery/speech.py): the captured step
cut into its encoder and decoder graphs, each exported and checked against its own part of the torch program, and
written as a pair, `NAME.encoder.onnx` and `NAME.decoder.onnx` (both or neither). `runtime.speech.Transcriber` runs
them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.onnx import OnnxExport, export_onnx
from exporters.onnx_files import onnx_files
from exporters.swappable import SwappableExport, export_swappable
from runtime.speech import PACK_FINGERPRINT
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.packs import fingerprint
from surgery.parity import ATOL, RTOL
from surgery.sites import ADAPTER_ROOT
from surgery.speech import split


def speech_paths(path: str | Path) -> tuple[Path, Path]:
    """NAME.onnx -> (NAME.encoder.onnx, NAME.decoder.onnx)."""
    path = Path(path)
    stem = path.name.removesuffix(".onnx")
    return path.with_name(f"{stem}.encoder.onnx"), path.with_name(f"{stem}.decoder.onnx")


@dataclass(frozen=True)
class SpeechExport:
    """The two graphs written, each with its parity against torch."""

    encoder: OnnxExport | SwappableExport
    decoder: OnnxExport | SwappableExport

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


def export_speech_swappable(
    captured: Captured, path: str | Path, *, tolerance: float = ATOL, rtol: float = RTOL, external: bool = False
) -> SpeechExport:
    """The pair with adapter slots (exporters/swappable.py): each graph has the slots of its own sites, and each is
    checked with no pack (= the base) and with its part of the model's own pack (= the adapted model). Each graph's
    slot metadata is that of its sites; both also carry the whole model's pack fingerprint (`surgery.speech_pack`),
    so that one pack of every site, as `surgery pack` makes it, applies to the pair (`Transcriber.load` splits it
    by site)."""
    manifest = captured.manifest
    if manifest is None:
        raise SurgeryError(f"{captured.source.name}: --swappable needs an adapted model; run `surgery insert` first")
    meta = {PACK_FINGERPRINT: str(fingerprint(manifest))}
    if captured.decoding is not None:
        meta.update(captured.decoding.to_metadata())
    written = []
    try:
        for (gm, sig), part_path in zip(split(captured.gm, captured.signature), speech_paths(path)):
            own = [name for name, _ in gm.named_parameters() if name.startswith(ADAPTER_ROOT + ".")]
            sites = tuple(s for s in manifest.sites if any(n.startswith(f"{ADAPTER_ROOT}.{s.path}.") for n in own))
            if not sites:
                raise SurgeryError(
                    f"--swappable {part_path.name}: this graph holds no adapter, so it has no slots; insert adapters "
                    "into both the encoder and the decoder, or export without --swappable"
                )
            part = dataclasses.replace(
                captured, gm=gm, signature=sig, manifest=dataclasses.replace(manifest, sites=sites, signature=sig)
            )
            written.append(
                export_swappable(part, part_path, tolerance=tolerance, rtol=rtol, external=external, metadata=meta)
            )
    except BaseException:
        for done in written:
            for file in onnx_files(done.path):
                file.unlink(missing_ok=True)
        raise
    return SpeechExport(*written)
