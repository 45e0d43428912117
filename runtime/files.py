"""Files that come from elsewhere are data: checks that run before a library parses them (the runtime's doors).

`check_safetensors` refuses a pack whose header lies about its length or offsets, `read_config` a config.json
of absurd size or depth or one that asks for remote code, `check_onnx_data` an ONNX model whose external data
lies outside its folder, and `check_name` a name that would become a path. Each refusal is a `SurgeryError` of
one line that names the file or field and the way out. The `.pt2` checks of the exporter are in
`surgery/safe_files.py`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SurgeryError

MAX_JSON_BYTES = 16 << 20  # a config.json or safetensors header beyond this is not a model description
MAX_JSON_DEPTH = 64


def check_safetensors(path: str | Path, name: str | None = None) -> None:
    """Refuse a safetensors file whose header lies: a length beyond the file, or tensors outside its data."""
    path = Path(path)
    name = name or str(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_JSON_BYTES):
            raise SurgeryError(
                f"{name}: its safetensors header claims {n:,} bytes but the file holds {size:,}; "
                "the file is damaged or forged, write it again with `surgery pack` or safetensors"
            )
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError) as exc:
            raise SurgeryError(f"{name}: its safetensors header is not JSON ({exc}); the file is damaged") from exc
    data = size - 8 - n
    if not isinstance(header, dict):
        raise SurgeryError(f"{name}: its safetensors header is not a JSON object; the file is damaged")
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1] <= data:
            raise SurgeryError(
                f"{name}: tensor {tensor} lies outside the file's {data:,} data bytes ({offsets}); "
                "the file is damaged or forged"
            )


def read_config(path: str | Path, name: str) -> dict[str, Any]:
    """A Hugging Face config.json within sane size and depth that asks for no remote code; its dict."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise SurgeryError(
            f"{name}: {path.name} is {size:,} bytes, absurd for a model config (at most {MAX_JSON_BYTES:,})"
        )
    text = path.read_bytes()
    depth = deepest = 0
    for ch in text:  # before json.loads, which recurses once per level
        if ch in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in b"]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise SurgeryError(
            f"{name}: {path.name} nests {deepest} levels deep, absurd for a model config (at most {MAX_JSON_DEPTH})"
        )
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise SurgeryError(f"{name}: {path.name} is not JSON ({exc}); fix or regenerate it") from exc
    if isinstance(config, dict) and config.get("auto_map"):
        raise SurgeryError(
            f"{name}: {path.name} asks for the model's own Python code (auto_map: "
            f"{', '.join(map(str, config['auto_map']))}); this tool never runs code from a model folder: "
            "use an architecture transformers ships, or capture the model yourself and pass the .pt2"
        )
    return config


def check_onnx_data(path: str | Path) -> None:
    """Refuse an ONNX model whose external data lies outside its folder, is missing, or is shorter than claimed."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for a damaged file
        raise SurgeryError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    folder = path.resolve().parent
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = info.get("location", "")
        target = (folder / where).resolve()
        if not where or Path(where).is_absolute() or not target.is_relative_to(folder):
            raise SurgeryError(
                f"{path}: tensor {tensor.name} points to external data {where!r} outside the model's folder; "
                "refused: an ONNX file may only read data beside it"
            )
        if not target.is_file():
            raise SurgeryError(
                f"{path}: tensor {tensor.name} needs external data {where}, which is missing beside the model"
            )
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > target.stat().st_size:
            raise SurgeryError(
                f"{path}: tensor {tensor.name} reads {where} up to byte {end:,}, beyond its {target.stat().st_size:,}"
            )


def external_locations(path: str | Path) -> list[str]:
    """The external-data files an ONNX model reads (relative to its folder); check_onnx_data them first."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = {
        e.value
        for t in _onnx_tensors(model.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return sorted(found)


def _onnx_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of a graph: initializers, sparse initializers, node attributes, and those of subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for g in attr.graphs:
                yield from _onnx_tensors(g)


def check_name(name: str, what: str) -> str:
    """A name that becomes a file or folder name: no separators, no `..`, nothing hidden, not empty."""
    if not name or "/" in name or "\\" in name or "\x00" in name or name.startswith(".") or ":" in name:
        raise SurgeryError(
            f"{what} {name!r} cannot be used: it becomes a file or folder name, so no '/', '\\', ':', "
            "leading '.' or '..'; choose a plain name such as model_a"
        )
    return name
