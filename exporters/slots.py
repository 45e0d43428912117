"""The swappable format's metadata: what a swappable ONNX export (`exporters/swappable.py`) and a refittable
engine's sidecar (`exporters/tensorrt.py`) record for their readers (`exporters/runtime.py`, `surgery swap`).
Its own module so that the writer can check its output with the reader without an import cycle."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import onnx

from surgery.adapters import AdapterSpec, spec_from_json
from surgery.bundle import Manifest
from surgery.errors import SurgeryError
from surgery.packs import fingerprint, packable_spec
from surgery.sites import ADAPTER_ROOT


@dataclass(frozen=True)
class SwappableMeta:
    """What a swappable export records for its readers (`AdaptedSession`, `surgery swap`), as string metadata:
    ONNX `metadata_props`, and a refittable engine's sidecar. The fingerprint packs must match, each site's
    width by module path, the adapter spec, and for a refittable engine the rank it was built at."""

    fingerprint: int
    widths: dict[str, int]
    adapter: AdapterSpec
    max_rank: int | None = None  # refittable engines only (tensorrt.py)

    FINGERPRINT: ClassVar[str] = "surgery.fingerprint"
    SITES: ClassVar[str] = "surgery.sites"  # JSON {site path: width}
    ADAPTER: ClassVar[str] = "surgery.adapter"  # JSON of the adapter spec
    MAX_RANK: ClassVar[str] = "surgery.max_rank"

    @classmethod
    def of(cls, manifest: Manifest, what: str, max_rank: int | None = None) -> SwappableMeta:
        """The metadata of an export of the adapted model `manifest` describes (bottleneck adapters only)."""
        spec = packable_spec(manifest, what)
        return cls(fingerprint(manifest), manifest.widths, spec, max_rank)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            self.FINGERPRINT: str(self.fingerprint),
            self.SITES: json.dumps(self.widths),
            self.ADAPTER: json.dumps(self.adapter.to_json()),
        }
        if self.max_rank is not None:
            meta[self.MAX_RANK] = str(self.max_rank)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str) -> SwappableMeta:
        """Read back what `to_metadata` wrote; a model without adapter slots is a SurgeryError for `where`."""
        if cls.FINGERPRINT not in meta:
            raise SurgeryError(f"{where}: not a swappable export (no adapter slots); export it with --swappable")
        try:
            adapter = spec_from_json(json.loads(meta[cls.ADAPTER]))
            widths = {str(k): int(v) for k, v in json.loads(meta[cls.SITES]).items()}
            max_rank = int(meta[cls.MAX_RANK]) if cls.MAX_RANK in meta else None
            slots = cls(int(meta[cls.FINGERPRINT]), widths, adapter, max_rank)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SurgeryError(
                f"{where}: damaged swappable metadata ({type(exc).__name__}: {exc}); export it again"
            ) from exc
        if not isinstance(slots.adapter, AdapterSpec):
            method = slots.adapter.method
            raise SurgeryError(f"{where}: the slots are for {method} adapters, not bottlenecks; export it again")
        return slots


def base_only(model: onnx.ModelProto, widths: Mapping[str, int]) -> onnx.ModelProto | None:
    """The base model inside a swappable export: each bottleneck slot cut out and its input wired to its users.

    With no pack active a slot adds zero, yet ONNX Runtime still runs it: two empty GEMMs, a fill and two full-size
    adds per site. The session that runs the base model (no pack) takes this graph instead, so no pack costs nothing.
    A slot is `x -> MatMul(down_w) -> Add(down_b) -> σ -> MatMul(up_w) -> Add(x, ·) -> Add(up_b)`; the result of the
    last Add is replaced by `x`, and every node that then feeds no output is dropped. None when a slot has another
    form (the slot path stays the only one).
    """
    model = copy.deepcopy(model)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    replace: dict[str, str] = {}
    for site in widths:
        down = consumers.get(f"{ADAPTER_ROOT}.{site}.down_w", [])
        up_b = consumers.get(f"{ADAPTER_ROOT}.{site}.up_b", [])
        if len(down) != 1 or len(up_b) != 1 or down[0].op_type != "MatMul" or up_b[0].op_type != "Add":
            return None
        x = down[0].input[0]
        residual = producer.get(next(i for i in up_b[0].input if i != f"{ADAPTER_ROOT}.{site}.up_b"))
        if residual is None or residual.op_type != "Add" or x not in residual.input:
            return None
        replace[up_b[0].output[0]] = x
    slot_ends = [node for node in graph.node if any(o in replace for o in node.output)]
    for node in slot_ends:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in replace:
                name = replace[name]
            node.input[i] = name
    for out in graph.output:  # a slot's result that is itself an output gets an Identity of its input
        if out.name in replace:
            graph.node.append(onnx.helper.make_node("Identity", [replace[out.name]], [out.name]))
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # the proto's nodes are in topological order
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed or not i.name.startswith(ADAPTER_ROOT + ".")]
    del graph.input[:]
    graph.input.extend(inputs)
    return model
