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
def atomic_output(path: str | Path, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path (same folder and suffix); rename it to `path` only if the block succeeds.

    `companions` are suffixes of files that belong with the output (ONNX external data: `.data`, so
    `NAME.onnx` + `NAME.onnx.data`): whatever the block wrote as `tmp` + suffix moves with it, first, and
    a stale one at the target that this write did not produce is removed, so a pair is both or neither.
    """
    path = check_output(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    tmp = folder / path.name  # same name: formats that record their file name (torch.export archives) stay clean
    moved: list[Path] = []
    stale: list[Path] = []
    done = False
    try:
        yield tmp
        for suffix in companions:
            target = path.with_name(path.name + suffix)
            if (folder / target.name).exists():
                os.replace(folder / target.name, target)
                moved.append(target)
            elif target.exists():
                stale.append(target)  # the old pair's data: the new model does not read it
        os.replace(tmp, path)
        done = True
        for target in stale:
            target.unlink(missing_ok=True)
    finally:
        if not done:
            for target in moved:  # the model never arrived: take its data back out
                target.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
