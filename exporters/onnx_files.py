"""An exported model's files: NAME.onnx alone, or NAME.onnx + NAME.onnx.data past 2 GB of tensors, written and
moved into place as a pair. Below the exporters and the verifier, which both write and read such pairs."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from surgery.errors import SurgeryError
from surgery.io import atomic_output

# Past this many bytes of initializers a model is written as NAME.onnx + NAME.onnx.data: protobuf cannot
# serialise a message of 2 GiB (2,147,483,648 bytes) or more, and the graph itself needs some room.
EXTERNAL_THRESHOLD = 2_000_000_000
THRESHOLD_ENV = "SURGERY_EXTERNAL_THRESHOLD"  # bytes; lower it to test the pair on a small model
DATA = ".data"  # NAME.onnx -> NAME.onnx.data


def external_threshold() -> int:
    """EXTERNAL_THRESHOLD, or the byte count in $SURGERY_EXTERNAL_THRESHOLD (for tests on small models)."""
    value = os.environ.get(THRESHOLD_ENV)
    if value is None:
        return EXTERNAL_THRESHOLD
    if not value.isdigit():
        raise SurgeryError(f"${THRESHOLD_ENV}={value!r}: give a number of bytes, e.g. {THRESHOLD_ENV}=1000000")
    return int(value)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers as they would be serialised."""
    return sum(init.ByteSize() for init in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: str | Path, external: bool = False) -> Path | None:
    """Write `model` at `path`; with `external`, or past the threshold, its tensors go to `path` + `.data`
    (returned), referenced by that name alone, so the pair moves as one (see `atomic_onnx`)."""
    path = Path(path)
    if not external and initializer_bytes(model) <= external_threshold():
        onnx.save(model, str(path))
        return None
    data = path.with_name(path.name + DATA)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,  # small tensors (shapes, scalars) stay in the graph
        convert_attribute=False,
    )
    if not data.exists():  # every tensor under size_threshold: they all stayed in the graph
        return None
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it private; the pair shares one mode
    return data


def atomic_onnx(path: str | Path):  # noqa: ANN201  a context manager of a temporary path
    """`atomic_output` for an ONNX model and its external data: both arrive, or neither."""
    return atomic_output(path, companions=(DATA,))


def onnx_files(path: str | Path) -> list[Path]:
    """An exported model's files: NAME.onnx, and NAME.onnx.data where its tensors are external."""
    path = Path(path)
    data = path.with_name(path.name + DATA)
    return [path, data] if data.is_file() else [path]


def onnx_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in onnx_files(path))
