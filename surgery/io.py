"""Outputs are written to a temporary file beside the target and renamed: never left half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgery.errors import SurgeryError


def check_output(path: str | Path) -> Path:
    """Fail early, before any work, when an output cannot be written where the user asked."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SurgeryError(f"output {path}: folder {path.parent} does not exist; create it or choose another -o")
    if path.is_dir():
        raise SurgeryError(f"output {path} is a folder; give a file name, e.g. -o {path / 'model.onnx'}")
    return path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (same folder and suffix); rename it to `path` only if the block succeeds."""
    path = check_output(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    tmp = folder / path.name  # same name: formats that record their file name (torch.export archives) stay clean
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
