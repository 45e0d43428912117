"""Adapter packs on the exporter's side: made from an adapted model's torch tensors, written, read as torch.

The format (`.safetensors` and `.onnx_adapter`), its reading and its checks against an export live in the runtime,
`runtime/packs.py`, which imports no torch; this module adds what needs a manifest or torch: the fingerprint of
an adapted model, the pack of its state dict, writing either format, and reading one back as torch tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from runtime import packs as runtime_packs
from runtime.packs import (  # noqa: F401  the reading and the checks are the runtime's
    BOTTLENECK_SHAPES,
    META_KEY,
    PACK_FORMAT,
    PACKABLE,
    SUFFIXES,
    Pack,
    check_pack,
)
from surgery.adapters import AdapterSpec
from surgery.errors import SurgeryError
from surgery.io import atomic_output
from surgery.sites import ADAPTER_ROOT

if TYPE_CHECKING:
    from surgery.bundle import Manifest


def packable_spec(manifest: Manifest, what: str) -> AdapterSpec:
    """The spec of a model whose adapters make a pack (bottlenecks after their sites), or a SurgeryError for `what`."""
    spec = manifest.adapter
    if not isinstance(spec, AdapterSpec) or spec.method not in PACKABLE:
        raise SurgeryError(
            f"{what} takes bottleneck adapters ({', '.join(PACKABLE)}), the ones a swappable export has slots for; "
            f"{spec.method} is not one: export that model baked (`surgery export`), or merge a LoRA (`surgery merge`)"
        )
    return spec


def fingerprint(manifest: Manifest) -> int:
    """What a pack must match: base sha256, method, activation, site paths; as a positive 31-bit int."""
    spec = packable_spec(manifest, "a pack")
    key = {
        "base": manifest.source.sha256,
        "method": spec.method,
        "activation": spec.activation,
        "sites": [s.path for s in manifest.sites],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # ORT stores model_version as int32


def pack_from_model(state: dict[str, torch.Tensor], manifest: Manifest) -> Pack:
    """The adapter tensors of an adapted model (its `state_dict()`) and its manifest; bottleneck adapters only."""
    spec = packable_spec(manifest, "a pack")
    tensors = {
        n: t.detach().to("cpu").contiguous().clone() for n, t in state.items() if n.startswith(ADAPTER_ROOT + ".")
    }
    if not tensors:
        raise SurgeryError("the model holds no adapter tensors (adapters.*); run `surgery insert` first")
    source = manifest.source
    meta = {
        "method": spec.method,
        "r": spec.r,
        "activation": spec.activation,
        "sites": [s.path for s in manifest.sites],
        "base": {"name": source.name, "sha256": source.sha256, "model_type": source.model_type},
    }
    return Pack(tensors=tensors, fingerprint=fingerprint(manifest), meta=meta)


def save_pack(pack: Pack, path: str | Path) -> Path:
    """Write a pack as `.safetensors` or `.onnx_adapter` (by suffix), atomically; bf16 tensors go to ONNX Runtime
    as their bits with their ONNX type (`runtime/packs.py`)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise SurgeryError(f"{path}: a pack is written as {' or '.join(SUFFIXES)}; change the suffix")
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            info = {"format": PACK_FORMAT, "fingerprint": pack.fingerprint, **pack.meta}
            tensors = {n: t if isinstance(t, torch.Tensor) else _torch(t) for n, t in pack.tensors.items()}
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(info)})
        else:
            arrays = {n: runtime_packs.as_numpy(t, runtime_packs.dtype_name(t)) for n, t in pack.tensors.items()}
            runtime_packs.write_onnx_adapter(arrays, pack.fingerprint, tmp)
    return path


def load_pack(path: str | Path) -> Pack:
    """Read a pack from either format (`runtime/packs.py`) as torch tensors; a damaged or foreign file is a
    SurgeryError."""
    pack = runtime_packs.load_pack(path)
    tensors = {n: _torch(t) for n, t in pack.tensors.items()}
    return Pack(tensors=tensors, fingerprint=pack.fingerprint, meta=pack.meta)


def _torch(array: np.ndarray) -> torch.Tensor:
    """A numpy pack array as a torch tensor; uint16 arrays are bfloat16 bits."""
    if runtime_packs.dtype_name(array) == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))
