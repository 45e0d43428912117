"""Hostile files made on the fly (never committed): payloads that create a marker file when code runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch


class Payload:
    """Unpickling it runs `touch MARKER`: what an attacker puts where a loader unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_payload(marker: Path) -> bytes:
    """A torch.save archive whose data.pkl runs the payload (as `data/sample_inputs/model.pt` is written)."""
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def raw_payload(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(Payload(marker), protocol=protocol)


def replace_member(src: Path, dst: Path, suffix: str, data: bytes | None = None, edit=None) -> Path:
    """Copy the zip `src` to `dst`, replacing the member whose name ends with `suffix` by `data`
    (or by `edit(old_bytes)`); members keep their order and are stored uncompressed, as torch writes them."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        hits = 0
        for info in zin.infolist():
            content = zin.read(info)
            if info.filename.endswith(suffix):
                content = data if data is not None else edit(content)
                hits += 1
            zout.writestr(info.filename, content)
    assert hits == 1, f"{suffix}: {hits} members"
    return dst


def edit_json(suffix: str, change):
    """An `edit` for replace_member that rewrites a JSON member with `change(doc)`."""

    def edit(content: bytes) -> bytes:
        doc = json.loads(content)
        change(doc)
        return json.dumps(doc).encode()

    return edit
