"""Baked ONNX: the adapted GraphModule through the dynamo exporter, adapter weights as ordinary initializers.

Dynamic batch and sequence axes come from the capture's `Signature`. Every export is checked against
torch in ONNX Runtime (see verify.py) before it is renamed into place: a model that fails the check is
never written at the output path.
"""

from __future__ import annotations

import re
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
    from exporters.quantize import Quantization, QuantReport
    from surgery.bundle import Manifest

OPSET = 20
# A causal LM with its cache is exported at opset 23, where the exporter writes RMSNormalization, RotaryEmbedding and
# Attention as one op each and ONNX Runtime runs each as one kernel (figures:
# benchmarks/results/docs_figures_2026-12-07.md).
OPSET_CACHE = 23


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX model, its parity with torch and how long the export took."""

    path: Path
    parity: Parity
    seconds: float
    data: Path | None = None  # NAME.onnx.data, where the tensors are external
    quantization: QuantReport | None = None  # a quantized base (exporters/quantize.py)

    def to_json(self) -> dict[str, Any]:
        return {
            **written(self.path, self.data),
            "export_seconds": round(self.seconds, 2),
            **self.parity.to_json(),
            **quantized_json(self.quantization),
        }


def written(path: Path, data: Path | None) -> dict[str, Any]:
    """The files of an export, as every export's JSON names them."""
    return {"onnx": str(path), "external_data": str(data) if data else None}


def quantized_json(report: QuantReport | None) -> dict[str, Any]:
    """An export's `quantization` field: what was quantized and how, and the measured distance from the float model
    (nothing for a float export)."""
    return {} if report is None else {"quantization": report.to_json()}


def worst(first: Parity, second: Parity) -> dict[str, Any]:
    """Two checks of one export in one line: their larger differences, and `second`'s bound."""
    return {
        "max_abs_diff": max(first.max_abs_diff, second.max_abs_diff),
        "max_rel_diff": max(first.max_rel_diff, second.max_rel_diff),
        "tolerance": second.tolerance,
        "rtol": second.rtol,
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


def lean_proto(proto: onnx.ModelProto, signature: Signature | None = None) -> onnx.ModelProto:
    """An exported ModelProto, rewritten in place into the form every export writes (in memory or streamed): without
    `value_info` (the exporter's inferred intermediate shapes), RMSNorm as `rms_norm_as_div`, and for a cache graph
    (`signature`) the cache axes named and attention in Attention-23's 3-D form (`attention_in_3d`).

    Without `value_info` ORT leaves Add + LayerNormalization unfused, and its SkipLayerNormalization kernel is the
    slower of the two on CPU (figures: benchmarks/README.md). The parity check still runs on the model as written.
    Swappable exports drop them anyway (they hold the traced rank).
    """
    del proto.graph.value_info[:]
    rms_norm_as_div(proto.graph)
    if signature is not None:
        name_cache_axes(proto, signature)
        name_unproven_axes(proto, signature)
        attention_in_3d(proto.graph)
    return proto


def name_unproven_axes(proto: onnx.ModelProto, signature: Signature) -> None:
    """An `unproven` axis (raw audio's samples; `Dim.DYNAMIC` at capture) is named after a symbol by torch (`s27`):
    that symbol becomes the axis's name (`samples`) in every input and output shape, within expressions too
    (`(samples//20)`)."""
    names = {}
    for value, spec in ((v, i) for i in signature.inputs for v in proto.graph.input if v.name == i.name):
        for k, axis in spec.axes.items():
            dim = value.type.tensor_type.shape.dim[k]
            if axis.unproven and dim.dim_param and dim.dim_param != axis.name:
                names[dim.dim_param] = axis.name
    if not names:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: names[m.group(1)], dim.dim_param)


def wiring(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """({tensor: the node that makes it}, {tensor: the nodes that read it}) of a graph's nodes."""
    made = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    return made, users


def rms_norm_as_div(graph: onnx.GraphProto) -> int:
    """Rewrite `x * Reciprocal(Sqrt(v))` as `x / Sqrt(v)`; returns how many Reciprocals went.

    torch writes RMSNorm (Llama, Qwen2, Gemma, SmolLM) with `rsqrt`, which the exporter spells Sqrt then Reciprocal
    then Mul. ONNX Runtime's SimplifiedLayerNormFusion only matches Sqrt then Div, so as exported every RMSNorm ran as
    six kernels; rewritten, each is one (figures: benchmarks/results/docs_figures_2026-12-07.md). Same algebra; the
    result may differ by an ulp.
    """
    made, users = wiring(graph)
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


def attention_in_3d(graph: onnx.GraphProto) -> int:
    """Rewrite a cache graph's attention (opset 23) in ONNX Attention's 3-D form; returns how many were rewritten.

    As exported, each layer splits q, k and v into heads (Reshape, Transpose), applies RotaryEmbedding to q and k
    per head, appends k and v to the cache (Concat with `past_key_values.N.*`, which is `present.N.*`), runs
    Attention on 4-D tensors and merges the heads back (Transpose, Reshape). Attention-23 does all of it itself:
    3-D q, k and v with `q_num_heads`/`kv_num_heads`, `past_key`/`past_value` as inputs and `present_key`/
    `present_value` as outputs, a 3-D output; RotaryEmbedding takes 3-D input with `num_heads`. So the 8 Reshape,
    Transpose and Concat nodes per layer go. SmolLM2-135M, one decode step at past 40 (2 threads, ORT 1.32 CPU,
    profiled): 810 kernels become 510, kernel time 0.88x. Only where q and k both pass through RotaryEmbedding
    (which names their head counts): GPT-2 and Gemma 3 (a norm per head) keep the 4-D form. Same arithmetic in
    ONNX Runtime: the logits and the cache were bit-identical on SmolLM2 (prefill and decode, a padded row).
    """
    made, users = wiring(graph)
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}

    def only_user(name: str, op: str) -> onnx.NodeProto | None:
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op and name not in outputs else None

    def heads(name: str) -> tuple[str, onnx.NodeProto | None, list[onnx.NodeProto]] | None:
        """`name` <- [RotaryEmbedding] <- Transpose(0, 2, 1, 3) <- Reshape <- x, each read once: (x, rotary, nodes)."""
        node, rotary = made.get(name), None
        if node is not None and node.op_type == "RotaryEmbedding" and len(node.input) == 3:
            rotary, node = node, made.get(node.input[0])
        if node is None or node.op_type != "Transpose" or list(node.attribute[0].ints) != [0, 2, 1, 3]:
            return None
        reshape = made.get(node.input[0])
        if reshape is None or reshape.op_type != "Reshape":
            return None
        chain = [reshape, node] + ([rotary] if rotary else [])
        if any(len(users.get(n.output[0], [])) != 1 for n in chain[:-1]):
            return None
        return reshape.input[0], rotary, chain

    def appended(name: str) -> tuple[onnx.NodeProto, tuple] | None:
        """`name` = Concat(past_key_values.N.*, new heads) along the sequence: (the Concat, heads(new))."""
        cat = made.get(name)
        if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or cat.input[0] not in inputs:
            return None
        if onnx.helper.get_attribute_value(cat.attribute[0]) not in (-2, 2):
            return None
        found = heads(cat.input[1])
        return (cat, found) if found else None

    constants = {t.name: len(t.dims) and t.dims[0] for t in graph.initializer}
    constants.update(
        (n.output[0], len(n.attribute[0].t.dims) and n.attribute[0].t.dims[0])
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    )

    def shape_length(name: str) -> int | None:
        """The length of a Reshape's target shape, where the graph makes it plain: a constant, or a Concat of
        constants and Shape slices."""
        if name in constants:
            return constants[name]
        node = made.get(name)
        if node is None or node.op_type != "Concat":
            return None
        total = 0
        for part in node.input:
            piece = made.get(part)
            if part in constants:
                total += constants[part]
            elif piece is not None and piece.op_type == "Shape":
                bounds = {a.name: a.i for a in piece.attribute}
                if "start" not in bounds or "end" not in bounds or bounds["end"] < 0 or bounds["start"] < 0:
                    return None
                total += bounds["end"] - bounds["start"]
            else:
                return None
        return total

    replaced: dict[int, list[onnx.NodeProto]] = {}
    gone: set[int] = set()
    for att in (n for n in graph.node if n.op_type == "Attention" and len(n.input) in (3, 4)):
        q, k, v = heads(att.input[0]), appended(att.input[1]), appended(att.input[2])
        if q is None or k is None or v is None or q[1] is None or k[1][1] is None or v[1][1] is not None:
            continue
        merge = only_user(att.output[0], "Transpose")
        back = merge and list(merge.attribute[0].ints) == [0, 2, 1, 3] and only_user(merge.output[0], "Reshape")
        if not back:
            continue
        # Attention's 3-D output has the merged heads' element order: a Reshape to (batch, seq, heads x dim) goes,
        # one to another shape (2-D, where a fused bottleneck reads it) stays and reads the 3-D output
        out = back.output[0] if shape_length(back.input[1]) == 3 else f"{att.output[0]}.3d"
        (k_cat, k_heads), (v_cat, v_heads) = k, v
        num = {tag: next(a.i for a in h[1].attribute if a.name == "num_heads") for tag, h in (("q", q), ("k", k_heads))}
        nodes = []
        for tag, (x, rotary, _) in (("q", q), ("k", k_heads)):
            node = onnx.helper.make_node(
                "RotaryEmbedding", [x, *rotary.input[1:]], [f"{att.output[0]}.{tag}"], name=f"{rotary.name}.3d"
            )
            node.attribute.extend(rotary.attribute)
            node.metadata_props.extend(rotary.metadata_props)
            nodes.append(node)
        node = onnx.helper.make_node(
            "Attention",
            [
                f"{att.output[0]}.q",
                f"{att.output[0]}.k",
                v_heads[0],
                att.input[3] if len(att.input) == 4 else "",
                k_cat.input[0],
                v_cat.input[0],
            ],
            [out, k_cat.output[0], v_cat.output[0]],
            name=f"{att.name}.3d",
            q_num_heads=num["q"],
            kv_num_heads=num["k"],
        )
        node.attribute.extend(a for a in att.attribute if a.name not in ("q_num_heads", "kv_num_heads"))
        node.metadata_props.extend(att.metadata_props)
        nodes.append(node)
        replaced[id(att)] = nodes
        gone.update(id(n) for n in [*q[2], *k_heads[2], *v_heads[2], k_cat, v_cat, merge])
        if out == back.output[0]:
            gone.add(id(back))
        else:
            back.input[0] = out
    rebuilt = []
    for n in graph.node:
        rebuilt.extend(replaced.get(id(n), [] if id(n) in gone else [n]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    return len(replaced)


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
            f"{what}: ONNX Runtime differs from torch{case} by more than --atol + --rtol x max|torch| allow: "
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
    quantize: Quantization | None = None,
    metadata: dict[str, str] | None = None,
) -> OnnxExport:
    """Export `gm` to ONNX at `path` with dynamic axes, verify it in ONNX Runtime, then move it into place.
    `metadata`: more entries of the model's `metadata_props`.

    Bottleneck adapters are exported in their fused form (surgery/fuse.py; `manifest` locates them in a
    reloaded .adapted.pt2); the check always compares with `gm` itself, unfused. Past 2 GB of initializers
    (or with `external`) the model is NAME.onnx + NAME.onnx.data, written as a pair.

    With `quantize` the base model's MatMul weights are quantized (exporters/quantize.py) and the bottlenecks stay
    unfused, so their GEMMs stay float; the check compares with `gm` holding the same quantized weights.
    """
    start = time.perf_counter()
    exported = (fused_copy(gm, manifest) if fuse and quantize is None else None) or gm
    proto = lean_proto(onnx_program(exported, signature, str(path)).model_proto, signature)
    quantized, reference = None, gm
    if quantize is not None:
        from exporters.quantize import Quantized

        quantized = Quantized.of(proto, quantize, str(path), gm)
        proto, reference = quantized.model, quantized.reference(gm)
    for key, value in (metadata or {}).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    with atomic_onnx(path) as tmp:
        data = save_onnx(proto, tmp, external)
        seconds = time.perf_counter() - start
        check_model(tmp, str(path))
        parity = check_onnx(tmp, reference, signature, tolerance=tolerance, rtol=rtol)
        refuse_mismatch(parity, str(path), " with the same quantized weights" if quantized else "")
        report = None
        if quantized is not None:
            report = quantized.checked(
                quantized.check_at_fp32(
                    lambda p, a, r: check_onnx(p, reference, signature, a, rtol=r), gm, str(path), external
                ),
                check_onnx(tmp, gm, signature, float("inf"), rtol=0.0),
            )
    data_path = Path(path).with_name(data.name) if data else None
    return OnnxExport(path=Path(path), parity=parity, seconds=seconds, data=data_path, quantization=report)
