"""Adapter packs: the adapter tensors of an adapted model alone, named exactly as in its graph.

Two files hold the same pack:

- `.safetensors`: the tensors, and the pack's description as JSON in the metadata key `surgery.pack`.
- `.onnx_adapter`: ONNX Runtime's adapter format (`onnxruntime.AdapterFormat`), which `LoraAdapter`
  memory-maps and `RunOptions.add_active_adapter` activates. It has no free-form metadata: its
  `adapter_version` is this pack format's version and its `model_version` the pack's fingerprint.

The fingerprint (a 31-bit integer: ORT keeps `model_version` as int32) identifies what a pack fits: the
base model's sha256, the method, the activation and the sites. A swappable export records the same
fingerprint, so a pack made for
another base, method or activation is refused before ONNX Runtime sees it. Tensor names and shapes are
checked one by one (`check_pack`): ONNX Runtime would silently keep the default of a missing tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from surgery.adapters import AdapterSpec
from surgery.errors import SurgeryError
from surgery.io import atomic_output
from surgery.safe_files import check_safetensors
from surgery.sites import ADAPTER_ROOT

if TYPE_CHECKING:
    from surgery.bundle import Manifest

PACK_FORMAT = 1
META_KEY = "surgery.pack"
SUFFIXES = (".safetensors", ".onnx_adapter")
# Bottleneck tensors and their shapes in terms of d (the site's width) and r (the rank).
BOTTLENECK_SHAPES = {"down_w": ("d", "r"), "down_b": ("r",), "up_w": ("r", "d"), "up_b": ("d",)}
PACKABLE = ("houlsby", "pfeiffer")  # the methods a swappable export (ONNX or refittable engine) has slots for


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


@dataclass
class Pack:
    """Adapter tensors by graph name (`adapters.<site>.down_w`, ...) and what they fit."""

    tensors: dict[str, torch.Tensor]
    fingerprint: int
    meta: dict[str, Any] = field(default_factory=dict)  # method, r, activation, sites, base; empty if unknown

    @property
    def rank(self) -> int:
        """The bottleneck size, read from the tensors (every site's down_w is (d, r))."""
        ranks = {t.shape[1] for n, t in self.tensors.items() if n.endswith(".down_w")}
        if len(ranks) != 1:
            raise SurgeryError(f"pack has down-projections of ranks {sorted(ranks)}; one pack holds one rank")
        return ranks.pop()

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "tensors": len(self.tensors),
            "parameters": sum(t.numel() for t in self.tensors.values()),
            "rank": self.rank,
            **self.meta,
        }


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
    """Write a pack as `.safetensors` or `.onnx_adapter` (by suffix), atomically."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise SurgeryError(f"{path}: a pack is written as {' or '.join(SUFFIXES)}; change the suffix")
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            info = {"format": PACK_FORMAT, "fingerprint": pack.fingerprint, **pack.meta}
            save_file(pack.tensors, str(tmp), metadata={META_KEY: json.dumps(info)})
        else:
            import onnxruntime as ort

            fmt = ort.AdapterFormat()
            fmt.set_adapter_version(PACK_FORMAT)
            fmt.set_model_version(pack.fingerprint)
            if any(t.dtype == torch.bfloat16 for t in pack.tensors.values()):
                raise SurgeryError(
                    f"{path}: a bf16 pack is written as .safetensors (numpy, and so ORT's adapter writer, has no "
                    "bfloat16); AdaptedSession converts it to the session's dtype when it loads it"
                )
            fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(t.numpy()) for n, t in pack.tensors.items()})
            fmt.export_adapter(str(tmp))
    return path


def load_pack(path: str | Path) -> Pack:
    """Read a pack from either format; a damaged or foreign file is a SurgeryError."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: no such pack file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix == ".onnx_adapter":
        return _load_onnx_adapter(path)
    raise SurgeryError(f"{path}: not a pack ({' or '.join(SUFFIXES)}); write one with `surgery pack`")


def _load_safetensors(path: Path) -> Pack:
    from safetensors import SafetensorError, safe_open

    check_safetensors(path)  # a header that lies about its length or offsets is refused before it is parsed
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SurgeryError(f"{path}: not a readable safetensors pack ({exc})") from exc
    if not isinstance(info, dict) or "fingerprint" not in info:
        raise SurgeryError(f"{path}: safetensors file without a surgery pack description; write it with `surgery pack`")
    fp = info.pop("fingerprint")
    info.pop("format", None)
    return Pack(tensors=tensors, fingerprint=int(fp), meta=info)


def _load_onnx_adapter(path: Path) -> Pack:
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
        tensors = {n: torch.from_numpy(np.array(v.numpy())) for n, v in params.items()}
    except Exception as exc:  # ORT raises its own types for a damaged flatbuffer
        raise SurgeryError(f"{path}: not a readable .onnx_adapter ({type(exc).__name__}: {exc})") from exc
    if fmt.get_adapter_version() != PACK_FORMAT:
        raise SurgeryError(
            f"{path}: adapter version {fmt.get_adapter_version()} is not a surgery pack (version {PACK_FORMAT})"
        )
    return Pack(tensors=tensors, fingerprint=int(fmt.get_model_version()))


def check_pack(
    pack: Pack, expected_fingerprint: int, widths: dict[str, int], max_rank: int | None = None, name: str = "pack"
) -> None:
    """Refuse a pack that does not fit: another base/method/activation, missing or extra tensors, bad shapes.

    `widths` maps each site path to its width d. The first mismatching tensor is named.
    """
    if pack.fingerprint != expected_fingerprint:
        made_for = pack.meta.get("base", {}).get("name")
        detail = f" (made for {made_for}, {pack.meta.get('method')}, {pack.meta.get('activation')})" if made_for else ""
        raise SurgeryError(
            f"{name} was made for another model{detail}: its base model, method, activation or sites differ "
            "from this export's; make the pack from a model adapted from the same base with the same settings"
        )
    expected = {f"{ADAPTER_ROOT}.{site}.{t}": (site, t) for site in widths for t in BOTTLENECK_SHAPES}
    for tensor_name in sorted(expected):
        if tensor_name not in pack.tensors:
            raise SurgeryError(
                f"{name} lacks tensor {tensor_name}; it would silently keep its default. Re-make the pack"
            )
    for tensor_name in sorted(pack.tensors):
        if tensor_name not in expected:
            raise SurgeryError(f"{name} has tensor {tensor_name}, which this model does not have; re-make the pack")
    first = pack.tensors[f"{ADAPTER_ROOT}.{next(iter(widths))}.down_w"]
    rank = int(first.shape[-1])
    for tensor_name in sorted(expected):
        site, kind = expected[tensor_name]
        tensor = pack.tensors[tensor_name]
        want = tuple(widths[site] if s == "d" else rank for s in BOTTLENECK_SHAPES[kind])
        if tuple(tensor.shape) != want:
            raise SurgeryError(
                f"{name}: tensor {tensor_name} has shape {list(tensor.shape)}, expected {list(want)} "
                f"(d={widths[site]}, r={rank}); the pack is damaged or mixes ranks"
            )
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise SurgeryError(f"{name}: tensor {tensor_name} is {tensor.dtype}, expected float32, float16 or bfloat16")
    if max_rank is not None and rank > max_rank:
        raise SurgeryError(
            f"{name} has rank {rank}, above this engine's maximum {max_rank}; rebuild with a larger --max-r"
        )
