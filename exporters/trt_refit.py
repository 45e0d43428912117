"""The refittable engine's ONNX: adapter tensors kept as named initializers at a fixed rank, and packs padded to it.

The adapter tensors stay named, unfolded initializers (`adapters.<site>.down_w` ...) consumed directly by
`MatMul`/`Add`, so TensorRT's ONNX parser names the engine's weights after them (it calls
`INetworkDefinition.set_weights_name` with the ONNX names). A refit keeps tensor sizes, so the rank is fixed at
`max_r` and a smaller pack is zero-padded, which is exact: padded down-projection columns and biases are zero, and the
padded up-projection rows that would read them are zero too. No TensorRT needed.

Refitting: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/refitting-engines.html
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from exporters.onnx import OPSET, onnx_program
from exporters.slots import SwappableMeta
from exporters.swappable import _with_adapters
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.packs import BOTTLENECK_SHAPES, Pack, check_pack, pack_from_model
from surgery.sites import ADAPTER_ROOT


def pad_pack(pack: Pack, max_r: int) -> dict[str, np.ndarray]:
    """Zero-pad every tensor of a bottleneck pack from rank r to `max_r` (exact: see the module docstring)."""
    r = pack.rank
    out = {}
    for name, t in pack.tensors.items():
        kind = name.rsplit(".", 1)[-1]
        a = t.detach().to(torch.float32).numpy()
        widths = [(0, max_r - r if s == "r" else 0) for s in BOTTLENECK_SHAPES[kind]]
        out[name] = np.ascontiguousarray(np.pad(a, widths))
    return out


def refit_weights(meta: dict[str, str], pack: Pack, what: str = "pack") -> dict[str, np.ndarray]:
    """The weights a refit sets, by TensorRT weight name (= ONNX initializer name), padded to the engine's rank.

    `meta` is the metadata of the refittable ONNX (also kept in the engine's sidecar). Refuses a pack made for
    another base/method/activation/sites, with missing, extra or misshapen tensors, or of a rank above max_r.
    """
    slots = SwappableMeta.from_metadata(meta, what)
    if slots.max_rank is None:
        raise SurgeryError(f"{what}: the engine is not refittable; build it with --swappable --max-r R")
    check_pack(pack, slots.fingerprint, slots.widths, max_rank=slots.max_rank, name=what)
    return pad_pack(pack, slots.max_rank)


def refittable_onnx(captured: Captured, max_r: int, pack: Pack | None = None) -> onnx.ModelProto:
    """The adapted model's ONNX with its adapter initializers at rank `max_r`, filled from `pack` (default: its own).

    Traced with distinct random adapter values so that the exporter keeps one named initializer per tensor
    (it merges identical ones), then every adapter initializer is overwritten with the padded pack.
    """
    manifest = captured.manifest
    if manifest is None:
        raise SurgeryError(f"{captured.source.name}: --swappable needs an adapted model; run `surgery insert` first")
    slots = SwappableMeta.of(manifest, "--swappable --trt", max_rank=max_r)
    if not 1 <= max_r < min(slots.widths.values()):
        raise SurgeryError(f"--max-r {max_r}: the rank must be in 1..{min(slots.widths.values()) - 1} for this model")
    pack = pack or pack_from_model(captured.gm.state_dict(), manifest)
    meta = slots.to_metadata()
    padded = refit_weights(meta, pack, f"--max-r {max_r}: the model's own adapters")
    program = onnx_program(_with_adapters(captured.gm, "random"), captured.signature, captured.source.name, OPSET)
    proto = program.model_proto
    found = {init.name: init for init in proto.graph.initializer if init.name in padded}
    assert set(found) == set(padded), f"exporter lost adapter initializers: {sorted(set(padded) - set(found))[:3]}"
    for name, array in padded.items():
        found[name].CopyFrom(numpy_helper.from_array(array, name))
    del proto.graph.value_info[:]  # shapes inferred at the traced rank no longer hold
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return proto


def weight_names(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Adapter weights as TensorRT's ONNX parser will name them: initializer name -> shape.

    Raises if an adapter initializer is not consumed directly by a MatMul or Add: behind a Transpose or a
    Reshape the builder would fold it into an anonymous constant, and a refit could not address it.
    """
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer if i.name.startswith(ADAPTER_ROOT + ".")}
    consumers: dict[str, set[str]] = {n: set() for n in inits}
    for node in model.graph.node:
        for name in node.input:
            if name in consumers:
                consumers[name].add(node.op_type)
    for name, ops in consumers.items():
        if not ops or not ops <= {"MatMul", "Add"}:
            raise SurgeryError(
                f"adapter tensor {name} feeds {sorted(ops) or 'nothing'}, not MatMul/Add: it would not stay refittable"
            )
    return inits
