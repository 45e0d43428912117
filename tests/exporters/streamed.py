"""What the streamed-export tests compare: an ONNX file's tensors, and the in-memory export's found in the streamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def arrays(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model (without its external data) and every initializer as an array, external data read."""
    model = onnx.load(str(path), load_external_data=False)
    return model, {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in model.graph.initializer}


def assert_in_streamed(streamed: dict[str, np.ndarray], memory: dict[str, np.ndarray], skip=()) -> None:
    """Every tensor of the in-memory export (but `skip`) is one of the streamed file's, by name or transposed: the
    in-memory optimizer folds a Linear's transpose into an anonymous tensor; the streamed graph keeps the
    checkpoint's layout."""
    for name, want in memory.items():
        if name in skip:
            continue
        if name in streamed:
            assert streamed[name].dtype == want.dtype and streamed[name].tobytes() == want.tobytes(), name
            continue
        same = [
            k
            for k, have in streamed.items()
            if have.ndim == 2 and have.T.shape == want.shape and np.array_equal(have.T, want)
        ]
        assert same, f"{name} {want.shape}: no streamed tensor equals it, as is or transposed"
