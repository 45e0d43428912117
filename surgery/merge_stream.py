"""LoRA merged into a checkpoint on disk: a weightless capture's LoRA adapters (surgery/meta.py) folded into the
safetensors shards they touch, one tensor at a time; every other tensor is copied byte for byte.

    W <- W + (alpha/r)·(A B)ᵀ   (nn.Linear layout; Conv1D takes (A B))

The arithmetic is merge.py's (`_add_lora`, in the capture's dtype); the result is written back in the checkpoint's
own dtype, at the same offsets: each output shard is its source shard copied, then the merged tensors written over
their own bytes. The folder (config, index, shards, other files) is written beside the target and renamed into place,
so it arrives whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.adapters import LoRA
from surgery.errors import SurgeryError
from surgery.graph import adapter_nodes
from surgery.merge import _add_lora, _Projection, _projection
from surgery.meta import MetaCaptured, read_tensor
from surgery.weight_files import SAFETENSORS_DTYPES


@dataclass(frozen=True)
class StreamMerge:
    """A merged checkpoint folder: the tensors rewritten (checkpoint names), of how many, and the bytes copied."""

    folder: Path
    merged: tuple[str, ...]
    tensors: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "merged": list(self.merged), "tensors": self.tensors, "bytes": self.bytes}


def merge_lora_streamed(captured: MetaCaptured, out: str | Path) -> StreamMerge:
    """Write `captured`'s checkpoint with its LoRA adapters merged into the folder `out` (which must not exist)."""
    assert captured.checkpoint is not None and captured.keys is not None
    out = Path(out)
    if out.exists():
        raise SurgeryError(f"{out}: exists; name a new folder for the merged checkpoint")
    names = {id(p): n for n, p in captured.gm.named_parameters()}
    touched: dict[str, list[tuple[LoRA, _Projection]]] = {}
    for node in adapter_nodes(captured.gm):
        m = captured.gm.get_submodule(str(node.target))
        if not isinstance(m, LoRA):
            raise SurgeryError(
                f"{node.target}: a {type(m).__name__} adapter; the streamed merge folds LoRA only "
                "(export the model with --stream to keep other adapters)"
            )
        proj = _projection(captured.gm, node.args[-1])
        touched.setdefault(captured.keys[names[id(proj.weight)]], []).append((m, proj))
    if not touched:
        raise SurgeryError(f"{captured.source.name}: no LoRA adapters to merge; insert them first")
    source = captured.checkpoint.folder
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        copied = 0
        for f in sorted(source.iterdir()):
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)  # shards too: the merged tensors are written over their bytes
                copied += f.stat().st_size
        by_shard: dict[str, list[str]] = {}
        for key in touched:
            by_shard.setdefault(captured.checkpoint.shards[key], []).append(key)
        for shard, keys in by_shard.items():
            _rewrite(tmp / shard, {k: touched[k] for k in keys}, captured.dtype)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return StreamMerge(out, tuple(sorted(touched)), len(captured.checkpoint.shards), copied)


def _rewrite(shard: Path, touched: dict[str, list[tuple[LoRA, _Projection]]], dtype: torch.dtype) -> None:
    """Each touched tensor of `shard` read, merged in `dtype`, and written back over itself in its own dtype."""
    with open(shard, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for key, loras in touched.items():
            entry = header[key]
            start, end = entry["data_offsets"]
            own = SAFETENSORS_DTYPES[entry["dtype"]]
            weight = read_tensor(f, size, entry).to(dtype)
            with torch.no_grad():
                for lora, proj in loras:
                    _add_lora(_Projection(weight, proj.bias_node, proj.node, proj.layout), lora, sign=1.0)
            merged = weight.to(own).contiguous().reshape(-1).view(torch.uint8).numpy()
            assert merged.nbytes == end - start
            f.seek(8 + size + start)
            f.write(memoryview(merged))
