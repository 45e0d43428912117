"""Adapted models on disk: `NAME.adapted.pt2`, a `torch.export.save` archive with a manifest inside.

`torch.export.load(path).module()` runs (and trains) the model with no help from this tool; the manifest
(`surgery.json`, an extra file of the archive) says what was done to which source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from surgery import __version__
from surgery.adapters import AdapterSpec
from surgery.capture import Captured, export_program
from surgery.insert import InsertReport
from surgery.io import atomic_output
from surgery.load import MANIFEST


def manifest(captured: Captured, spec: AdapterSpec, report: InsertReport) -> dict[str, Any]:
    return {
        "tool": "surgery",
        "version": __version__,
        "source": captured.source.to_json(),
        "adapter": spec.to_json(),
        "sites": [s.to_json() for s in report.sites],
        "params": {"trainable": report.trainable, "total": report.total},
        "signature": captured.signature.to_json(),
    }


def save_adapted(
    path: str | Path,
    captured: Captured,
    spec: Any,
    report: InsertReport,
    *,
    extra: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Re-export the adapted GraphModule (same dynamic axes) and save it with its manifest, atomically.

    `spec` is anything with `to_json()` (AdapterSpec, LoraSpec, the specs of merge.py); `extra` adds manifest
    keys, `files` more extra files of the archive (text).
    """
    meta = {**manifest(captured, spec, report), **(extra or {})}
    program = export_program(captured.gm, captured.signature, str(path))
    with atomic_output(path) as tmp:
        torch.export.save(program, tmp, extra_files={MANIFEST: json.dumps(meta, indent=1), **(files or {})})
    return meta
