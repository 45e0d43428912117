"""The swappable format's metadata as the runtime reads it, and the base model cut out of a swappable export.

A swappable ONNX export (`exporters/swappable.py`) and a refittable engine's sidecar record, as string metadata:
the fingerprint packs must match, each site's width by module path, the adapter spec (JSON), and for a refittable
engine the rank it was built at. The exporter's `exporters/slots.py` writes them and reads the spec back as its
typed `AdapterSpec`; the runtime keeps the spec as its JSON.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import SurgeryError
from .packs import ADAPTER_ROOT

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class SlotsMeta:
    """What a swappable export records for its readers: fingerprint, widths by site, the adapter spec's JSON, and
    for a refittable engine its maximum rank."""

    fingerprint: int
    widths: dict[str, int]
    adapter: dict[str, Any]
    max_rank: int | None = None

    FINGERPRINT: ClassVar[str] = "surgery.fingerprint"
    SITES: ClassVar[str] = "surgery.sites"  # JSON {site path: width}
    ADAPTER: ClassVar[str] = "surgery.adapter"  # JSON of the adapter spec
    MAX_RANK: ClassVar[str] = "surgery.max_rank"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str) -> SlotsMeta:
        """Read the metadata back; a model without adapter slots is a SurgeryError for `where`."""
        if cls.FINGERPRINT not in meta:
            raise SurgeryError(f"{where}: not a swappable export (no adapter slots); export it with --swappable")
        try:
            adapter = json.loads(meta[cls.ADAPTER])
            method = adapter["method"]
            widths = {str(k): int(v) for k, v in json.loads(meta[cls.SITES]).items()}
            max_rank = int(meta[cls.MAX_RANK]) if cls.MAX_RANK in meta else None
            slots = cls(int(meta[cls.FINGERPRINT]), widths, adapter, max_rank)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SurgeryError(
                f"{where}: damaged swappable metadata ({type(exc).__name__}: {exc}); export it again"
            ) from exc
        if method in ("lora", "stack"):
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
    import onnx

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
    needed = drop_dead(graph)
    inputs = [i for i in graph.input if i.name in needed or not i.name.startswith(ADAPTER_ROOT + ".")]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def drop_dead(graph: Any) -> set[str]:
    """Remove the nodes and initializers of `graph` that no output depends on (in place); return the names it uses."""
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
    return needed
