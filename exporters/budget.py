"""Whether an in-memory export fits: an estimate of its peak memory against what the machine has, so that `surgery
export` can take the streamed path (exporters/stream.py) by itself when it would not.

The in-memory path holds the model, the exporter's copy of its initializers, the serialized model and ONNX Runtime's
session at once: its peak is several times the weights (`IN_MEMORY_FACTOR`; measured figures in
benchmarks/results/). The streamed path holds the graph, one block's weights and the page cache.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.memory import available

IN_MEMORY_FACTOR = 5.5  # peak resident memory of an in-memory export, in weights' bytes (the most measured)
BUDGET_ENV = "SURGERY_MEMORY_BUDGET"  # bytes (or 800M, 12G) the export may use; default: the memory available now
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Estimate:
    """An in-memory export's expected peak against the memory it may use."""

    weights: int  # bytes of the model's weights
    budget: int  # bytes the export may use
    where: str  # where the budget comes from

    @property
    def peak(self) -> int:
        return int(self.weights * IN_MEMORY_FACTOR)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def line(self) -> str:
        return (
            f"the in-memory export needs about {_size(self.peak)} ({IN_MEMORY_FACTOR:g} x {_size(self.weights)} of "
            f"weights), more than the {_size(self.budget)} {self.where}: streaming it instead (as --stream does)"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def budget() -> tuple[int, str] | None:
    """(bytes, where from): $SURGERY_MEMORY_BUDGET, else the memory available to this process now (the system's,
    capped by its cgroup's limit); None where neither is known."""
    value = os.environ.get(BUDGET_ENV)
    if value is not None:
        text = value.strip().upper().removesuffix("B")
        unit = UNITS.get(text[-1:], 1)
        number = text[:-1] if text[-1:] in UNITS else text
        try:
            return int(float(number) * unit), f"${BUDGET_ENV} allows"
        except ValueError:
            raise SurgeryError(
                f"${BUDGET_ENV}={value!r}: give the bytes an export may use, e.g. {BUDGET_ENV}=12G or 800M"
            ) from None
    room = available()
    if room is None:
        return None
    return room, "available"


def weight_bytes(source: str, dtype: str = "auto") -> int | None:
    """Bytes of the weights an export of `source` would hold: a `.pt2`'s weight records, a Hugging Face folder's
    safetensors (scaled to `dtype`); None for what the streamed path cannot read."""
    path = Path(source)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            sizes = [i.file_size for i in zf.infolist() if i.filename.split("/", 1)[-1].startswith("data/weights/")]
        return sum(sizes) or None
    if path.is_dir() and (path / "config.json").is_file():
        from surgery.weight_files import INDEX, SINGLE

        files = [path / SINGLE] if (path / SINGLE).is_file() else sorted(path.glob("*.safetensors"))
        if not (path / SINGLE).is_file() and not (path / INDEX).is_file():
            return None
        stored = sum(f.stat().st_size for f in files)
        return int(stored * _scale(path, dtype))
    return None


def _scale(folder: Path, dtype: str) -> float:
    """The size of `dtype` over the folder's own (its config's dtype, fp32 if it names none)."""
    import json

    sizes = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
    if dtype == "auto" or dtype not in sizes:
        return 1.0
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 1.0
    own = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return sizes[dtype] / sizes.get(own, 4)


def estimate(source: str, dtype: str = "auto") -> Estimate | None:
    """The in-memory export's estimate for `source`; None where the weights or the budget are unknown."""
    weights = weight_bytes(source, dtype)
    room = budget()
    if weights is None or room is None:
        return None
    return Estimate(weights, *room)
