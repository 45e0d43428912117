"""Adapter packs as the runtime reads them: numpy arrays by graph name, checked against an export.

Two files hold the same pack:

- `.safetensors`: the tensors, and the pack's description as JSON in the metadata key `surgery.pack`.
- `.onnx_adapter`: ONNX Runtime's adapter format (`onnxruntime.AdapterFormat`), which `LoraAdapter`
  memory-maps and `RunOptions.add_active_adapter` activates. It has no free-form metadata: its
  `adapter_version` is this pack format's version and its `model_version` the pack's fingerprint.

The fingerprint (a 31-bit integer: ORT keeps `model_version` as int32) identifies what a pack fits: the base
model's sha256, the method, the activation and the sites. A swappable export records the same fingerprint, so a
pack made for another base, method or activation is refused before ONNX Runtime sees it. Tensor names and shapes
are checked one by one (`check_pack`): ONNX Runtime would silently keep the default of a missing tensor.

numpy has no bfloat16: a bf16 tensor is read as its bits, a uint16 array, and handed to ONNX Runtime with its
ONNX type (`ortvalue`). In a pack a uint16 array always means bfloat16. The exporter makes packs of torch tensors
(`surgery/packs.py`); `check_pack` and `Pack` take either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SurgeryError
from .files import check_safetensors

PACK_FORMAT = 1
META_KEY = "surgery.pack"
SUFFIXES = (".safetensors", ".onnx_adapter")
ADAPTER_ROOT = "adapters"  # every adapter tensor's name starts with it: adapters.<site>.down_w
# Bottleneck tensors and their shapes in terms of d (the site's width) and r (the rank).
BOTTLENECK_SHAPES = {"down_w": ("d", "r"), "down_b": ("r",), "up_w": ("r", "d"), "up_b": ("d",)}
PACKABLE = ("houlsby", "pfeiffer")  # the methods a swappable export (ONNX or refittable engine) has slots for
FLOATS = ("float32", "float16", "bfloat16")
ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # onnx.TensorProto's element types
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


@dataclass
class Pack:
    """Adapter tensors by graph name (`adapters.<site>.down_w`, ...) and what they fit: numpy arrays as read here
    (bfloat16 as uint16 bits), torch tensors where the exporter made them."""

    tensors: dict[str, Any]
    fingerprint: int
    meta: dict[str, Any] = field(default_factory=dict)  # method, r, activation, sites, base; empty if unknown

    @property
    def rank(self) -> int:
        """The bottleneck size, read from the tensors (every site's down_w is (d, r))."""
        ranks = {int(t.shape[1]) for n, t in self.tensors.items() if n.endswith(".down_w")}
        if len(ranks) != 1:
            raise SurgeryError(f"pack has down-projections of ranks {sorted(ranks)}; one pack holds one rank")
        return ranks.pop()

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "tensors": len(self.tensors),
            "parameters": sum(math.prod(t.shape) for t in self.tensors.values()),
            "rank": self.rank,
            **self.meta,
        }


def dtype_name(tensor: Any) -> str:
    """float32, float16, bfloat16 ... of a numpy array (uint16: bfloat16's bits) or a torch tensor."""
    name = str(tensor.dtype).removeprefix("torch.")
    return "bfloat16" if name == "uint16" else name


def as_numpy(tensor: Any, dtype: str) -> np.ndarray:
    """A pack tensor (numpy, or torch from the exporter) as a contiguous numpy array of `dtype` (float32, float16,
    or bfloat16 as uint16 bits). bf16 -> fp32 is exact; fp32 -> bf16 rounds to nearest even."""
    if not isinstance(tensor, np.ndarray):  # a torch tensor: its bf16 goes through fp32, exactly
        tensor = tensor.detach().cpu()
        tensor = (tensor.float() if dtype_name(tensor) == "bfloat16" else tensor).numpy()
    if dtype_name(tensor) == dtype:
        return np.ascontiguousarray(tensor)
    if dtype_name(tensor) == "bfloat16":
        f32 = (tensor.astype(np.uint32) << 16).view(np.float32)
    else:
        f32 = tensor.astype(np.float32)
    if dtype != "bfloat16":
        return np.ascontiguousarray(f32.astype(dtype))
    bits = np.ascontiguousarray(f32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    return np.where(np.isnan(f32), 0x7FC0, rounded).astype(np.uint16)


def ortvalue(array: np.ndarray, device: tuple[str, int] = ("cpu", 0)) -> Any:
    """An OrtValue of a pack array: bfloat16 bits handed over with their ONNX type (CPU only: ORT copies such
    arrays to no other device)."""
    import onnxruntime as ort

    if dtype_name(array) == "bfloat16":
        if device[0] != "cpu":
            raise SurgeryError(
                f"a bfloat16 pack cannot be placed on {device[0]} from numpy; run it with io_binding=False"
            )
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, ONNX_TYPES["bfloat16"])
    return ort.OrtValue.ortvalue_from_numpy(array, *device)


def write_onnx_adapter(tensors: dict[str, np.ndarray], fingerprint: int, path: str | Path) -> Path:
    """Write numpy pack tensors in ONNX Runtime's adapter format at `path` (the caller makes it atomic)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(PACK_FORMAT)
    fmt.set_model_version(fingerprint)
    arrays = {n: np.ascontiguousarray(t) for n, t in tensors.items()}  # OrtValues view them: kept to the end
    fmt.set_parameters({n: ortvalue(a) for n, a in arrays.items()})
    fmt.export_adapter(str(path))
    return Path(path)


def load_pack(path: str | Path) -> Pack:
    """Read a pack from either format as numpy arrays; a damaged or foreign file is a SurgeryError."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: no such pack file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix == ".onnx_adapter":
        return _load_onnx_adapter(path)
    raise SurgeryError(f"{path}: not a pack ({' or '.join(SUFFIXES)}); write one with `surgery pack`")


def _bf16_bits(path: Path, name: str) -> np.ndarray:
    """A bf16 tensor of a safetensors file as its uint16 bits, read at the offsets its header gives (the header
    was checked by `check_safetensors`)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[name]
    begin, end = info["data_offsets"]
    shape = tuple(int(s) for s in info["shape"])
    if end - begin != 2 * math.prod(shape):
        raise SurgeryError(f"{path}: tensor {name} holds {end - begin} bytes, not {shape} bf16 values; damaged file")
    return np.fromfile(path, dtype="<u2", count=math.prod(shape), offset=8 + n + begin).reshape(shape)


def _load_safetensors(path: Path) -> Pack:
    from safetensors import SafetensorError, safe_open

    check_safetensors(path)  # a header that lies about its length or offsets is refused before it is parsed
    try:
        with safe_open(str(path), framework="np") as f:
            info = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            bf16 = [n for n in f.keys() if f.get_slice(n).get_dtype() == "BF16"]
            tensors = {n: f.get_tensor(n) for n in f.keys() if n not in bf16}
        tensors.update({n: _bf16_bits(path, n) for n in bf16})
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as exc:
        raise SurgeryError(f"{path}: not a readable safetensors pack ({exc})") from exc
    if not isinstance(info, dict) or "fingerprint" not in info:
        raise SurgeryError(f"{path}: safetensors file without a surgery pack description; write it with `surgery pack`")
    fp = info.pop("fingerprint")
    info.pop("format", None)
    return Pack(tensors=tensors, fingerprint=int(fp), meta=info)


def _bf16_value(value: Any) -> np.ndarray:
    """A bfloat16 OrtValue as its uint16 bits: ORT hands out no numpy view of it, so a one-node graph casts it to
    fp32 (exact) and the bits are taken back from that."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([cast], "bf16", [x], [y]), opset_imports=[helper.make_opsetid("", 20)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return as_numpy(session.run(None, {"x": value})[0], "bfloat16")


def _load_onnx_adapter(path: Path) -> Pack:
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
        tensors = {
            n: _bf16_value(v) if v.data_type() == "tensor(bfloat16)" else np.array(v.numpy()) for n, v in params.items()
        }
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
        if dtype_name(tensor) not in FLOATS:
            raise SurgeryError(
                f"{name}: tensor {tensor_name} is {dtype_name(tensor)}, expected float32, float16 or bfloat16"
            )
    if max_rank is not None and rank > max_rank:
        raise SurgeryError(
            f"{name} has rank {rank}, above this engine's maximum {max_rank}; rebuild with a larger --max-r"
        )


def active_adapter(path: str | Path) -> tuple[Any, Any]:
    """ONNX Runtime's adapter read from an `.onnx_adapter` file, and the RunOptions that activate it. The adapter
    must outlive the options that name it: keep both."""
    import onnxruntime as ort

    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return adapter, options
