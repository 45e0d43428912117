"""Baked ONNX: the adapted GraphModule through the dynamo exporter, adapter weights as ordinary initializers.

Dynamic batch and sequence axes come from the capture's `Signature`. Every export is checked against
torch in ONNX Runtime (see verify.py) before it is renamed into place: a model that fails the check is
never written at the output path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import fx
from torch.utils import _pytree as pytree

from exporters.onnx_files import atomic_onnx, save_onnx
from exporters.verify import check_onnx
from surgery.errors import SurgeryError
from surgery.fuse import fused_copy
from surgery.parity import ATOL, RTOL, Parity
from surgery.signature import Signature

if TYPE_CHECKING:
    from surgery.bundle import Manifest

OPSET = 20
# A causal LM with its cache is exported at opset 23, where the exporter writes RMSNormalization, RotaryEmbedding and
# Attention as one op each and ONNX Runtime runs each as one kernel. SmolLM2-135M, one decode step (2 threads, ONNX
# Runtime 1.32, alternated in one process): 992 kernels instead of 1715, 0.90x the time.
OPSET_CACHE = 23


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX model, its parity with torch and how long the export took."""

    path: Path
    parity: Parity
    seconds: float
    data: Path | None = None  # NAME.onnx.data, where the tensors are external

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.path),
            "external_data": str(self.data) if self.data else None,
            "export_seconds": round(self.seconds, 2),
            **self.parity.to_json(),
        }


def output_names(outputs: Any) -> list[str]:
    """Names of a model's output leaves: dict/ModelOutput keys, `output_i` for tuples, `output` for a tensor."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names = []
    for i, (path, _) in enumerate(leaves):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", i)))) for k in path]
        names.append("_".join(keys) if keys else "output")
    if len(names) > 1 and all(n.isdigit() for n in names):
        names = [f"output_{n}" for n in names]
    return names


def onnx_program(
    gm: fx.GraphModule, signature: Signature, what: str, opset: int | None = None, optimize: bool = True
) -> Any:
    """`torch.onnx.export` (dynamo) of `gm` over the signature's dynamic axes: an ONNXProgram.

    The opset is `OPSET`, except for a causal LM with its KV cache, which gets `OPSET_CACHE` unless `opset` says
    otherwise (the TensorRT path keeps `OPSET`). `optimize=False` leaves the graph as traced (weights keep their
    names; exporters/stream.py optimizes it)."""
    if opset is None:
        from surgery.tasks import cache_layout

        opset = OPSET_CACHE if cache_layout(signature) is not None else OPSET
    if any(n.op == "call_function" and "surgery.bottleneck" in str(n.target) for n in gm.graph.nodes):
        raise SurgeryError(
            f"{what}: this program calls surgery::bottleneck (written by `export --fused-pt2` for torch on CUDA), "
            "which ONNX has no op for; export the .adapted.pt2 it came from (baked ONNX fuses bottlenecks its own way)"
        )
    examples = signature.examples()
    args, kwargs = signature.export_args(examples)
    names = list(signature.outputs)
    if not names:
        with torch.no_grad():
            names = output_names(signature.call(gm, examples))
    try:
        return torch.onnx.export(
            gm,
            args,
            kwargs=kwargs,
            dynamic_shapes=signature.dynamic_shapes(),
            input_names=signature.names,
            output_names=names,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            optimize=optimize,
        )
    except Exception as exc:  # the exporter raises many types; its first line says which op failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(f"{what}: ONNX export failed ({type(exc).__name__}: {first})") from exc


def lean_proto(program: Any, signature: Signature | None = None) -> onnx.ModelProto:
    """The exported ModelProto without `value_info` (the exporter's inferred intermediate shapes).

    Measured on MiniLM, ONNX Runtime 1.32 CPU, b1 s128, interleaved: the same graph runs about 8-10%
    faster without them, because ORT then leaves Add + LayerNormalization unfused, and its
    SkipLayerNormalization kernel is the slower of the two on CPU. The parity check still runs on
    the model as written. Swappable exports drop them anyway (they hold the traced rank).
    """
    proto = program.model_proto
    del proto.graph.value_info[:]
    rms_norm_as_div(proto.graph)
    if signature is not None:
        name_cache_axes(proto, signature)
    return proto


def rms_norm_as_div(graph: onnx.GraphProto) -> int:
    """Rewrite `x * Reciprocal(Sqrt(v))` as `x / Sqrt(v)`; returns how many Reciprocals went.

    torch writes RMSNorm (Llama, Qwen2, Gemma, SmolLM) with `rsqrt`, which the exporter spells Sqrt then Reciprocal
    then Mul. ONNX Runtime's SimplifiedLayerNormFusion only matches Sqrt then Div, so as exported every RMSNorm ran as
    six kernels. Measured on SmolLM2-135M (decode step, 2 threads, alternated in one process): 2081 kernels per step
    become 1715 (61 fused norms), and the step takes 0.94x the time. Same algebra; the result may differ by an ulp.
    """
    made = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    gone = []
    for n in graph.node:
        if n.op_type != "Reciprocal" or getattr(made.get(n.input[0]), "op_type", None) != "Sqrt":
            continue
        readers = users.get(n.output[0], [])
        if not readers or any(r.op_type != "Mul" or list(r.input).count(n.output[0]) != 1 for r in readers):
            continue
        if any(n.output[0] == o.name for o in graph.output):
            continue
        for r in readers:
            other = r.input[1] if r.input[0] == n.output[0] else r.input[0]
            r.op_type = "Div"
            r.input[:] = [other, n.input[0]]
        gone.append(n)
    for n in gone:
        graph.node.remove(n)
    return len(gone)


CACHE_META = {"task": "surgery.task", "max_positions": "surgery.max_positions", "layers": "surgery.layers"}


def name_cache_axes(proto: onnx.ModelProto, signature: Signature) -> None:
    """A causal LM with its cache (surgery/tasks.py): the attention mask's and the present tensors' length axis is
    named `total` (torch names it after a symbol, `s53`, or writes `past + seq`), and the metadata says what the
    model is: `surgery.task`, `surgery.max_positions` (the positions a prompt and its new tokens may fill) and
    `surgery.layers` (for `exporters.runtime.Generator`)."""
    from surgery.tasks import CAUSAL_LM, TOTAL, cache_layout

    layers = cache_layout(signature)
    if layers is None:
        return
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name == "attention_mask" or value.name.startswith("present."):
            axis = 1 if value.name == "attention_mask" else 2
            value.type.tensor_type.shape.dim[axis].dim_param = TOTAL
    seq = signature.axes()["seq"]
    meta = {"task": CAUSAL_LM, "max_positions": str(seq.max), "layers": str(layers)}
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=CACHE_META[key], value=value))


def check_model(path: Path, what: str) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise SurgeryError(f"{what}: the exported model fails onnx.checker ({exc}); nothing was written") from exc


def refuse_mismatch(parity: Parity, what: str, case: str = "") -> None:
    if not parity.ok:
        raise SurgeryError(
            f"{what}: ONNX Runtime differs from torch{case} by more than --tolerance + --rtol x max|torch| allow: "
            f"{parity.summary()}; nothing was written"
        )


def export_onnx(
    gm: fx.GraphModule,
    signature: Signature,
    path: str | Path,
    *,
    tolerance: float = ATOL,
    rtol: float = RTOL,
    manifest: Manifest | None = None,
    fuse: bool = True,
    external: bool = False,
) -> OnnxExport:
    """Export `gm` to ONNX at `path` with dynamic axes, verify it in ONNX Runtime, then move it into place.

    Bottleneck adapters are exported in their fused form (surgery/fuse.py; `manifest` locates them in a
    reloaded .adapted.pt2); the check always compares with `gm` itself, unfused. Past 2 GB of initializers
    (or with `external`) the model is NAME.onnx + NAME.onnx.data, written as a pair.
    """
    start = time.perf_counter()
    exported = (fused_copy(gm, manifest) if fuse else None) or gm
    with atomic_onnx(path) as tmp:
        data = save_onnx(lean_proto(onnx_program(exported, signature, str(path)), signature), tmp, external)
        seconds = time.perf_counter() - start
        check_model(tmp, str(path))
        parity = check_onnx(tmp, gm, signature, tolerance=tolerance, rtol=rtol)
        refuse_mismatch(parity, str(path))
    data_path = Path(path).with_name(data.name) if data else None
    return OnnxExport(path=Path(path), parity=parity, seconds=seconds, data=data_path)
