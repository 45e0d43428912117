"""A streamed export's base weights quantized as they are written (exporters/stream.py, `--stream --quantize`).

The streamed graph keeps each checkpoint weight under its own name and multiplies by it through a Transpose (a
Linear) or directly (GPT-2's Conv1D). `plan` picks the MatMuls whose weight is such a checkpoint tensor read by that
MatMul alone (adapters never are: they do not come from the checkpoint); while the data file is written, each of
those tensors goes through ONNX Runtime's `MatMulNBitsQuantizer` by itself (`quantize_weight`: the same quantizer,
settings and rounding as inside a whole model), one tensor in memory at a time, and its packed blocks, scales and
zero points are appended to the data file instead of the float weight (a weight past `SLICE_BYTES` in slices of its
output columns, whose arrays are rows of the whole one's). `rewrite` then makes each planned MatMul a
`MatMulNBits` node reading them. The block-wise check reads the written blocks back (`dequantized`) as the torch
reference's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from exporters.quantize import (
    META,
    QuantizedWeight,
    Quantization,
    QuantReport,
    Record,
    _head_nodes,
    _is_adapter,
    dequantize_blocks,
    float_adapters,
    quantize_weight,
)
from surgery.errors import SurgeryError

ALIGN = 4096
# bytes of float weight quantized at a time: a large weight (a 7B model's head) goes through the quantizer in slices
# of its output columns, whose blocks, scales and zero points are rows of the whole one's (MatMulNBits lays them out
# column by column), so memory holds a slice and its copies, not the weight's
SLICE_BYTES = 64 << 20


@dataclass
class Planned:
    """One checkpoint weight to quantize: the float initializer, the MatMul reading it, how it reads it."""

    name: str  # the float initializer (the checkpoint tensor's name in the graph)
    key: str  # its checkpoint key
    matmul: str  # the MatMul node
    transpose: str | None  # the Transpose node between them (a Linear's weight is (N, K)), or None (K, N)
    dtype: torch.dtype | None = None  # what the graph takes it in
    written: QuantizedWeight | None = None  # after the data file: attributes and roles (no arrays)
    # role -> (offset, length, shape, ONNX dtype) in the data file; "float" where the quantizer left it float
    places: dict[str, tuple[int, int, tuple[int, ...], int]] = field(default_factory=dict)


def plan(
    proto: onnx.ModelProto, keys: dict[str, str], spec: Quantization
) -> tuple[dict[str, Planned], list[str], list[str]]:
    """{checkpoint key: Planned} of the MatMuls to quantize in `proto` (`keys`: {initializer: checkpoint key} of
    the weights streamed from the checkpoint), the head MatMuls kept float (--float-head), and the MatMuls that
    read an adapter tensor."""
    graph = proto.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    made = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    outputs = {o.name for o in graph.output}
    head = [] if spec.head else _head_nodes(graph)
    adapter = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(_is_adapter(x) for x in n.input)]
    planned: dict[str, Planned] = {}
    per_key: dict[str, int] = {}
    for name in keys:
        per_key[keys[name]] = per_key.get(keys[name], 0) + 1
    for n in graph.node:
        if n.op_type != "MatMul" or n.name in head or n.name in adapter:
            continue
        b, transpose = n.input[1], None
        src = made.get(b)
        if src is not None and src.op_type == "Transpose" and readers.get(b) == 1 and b not in outputs:
            perm = [list(a.ints) for a in src.attribute if a.name == "perm"]
            if perm != [[1, 0]]:
                continue
            b, transpose = src.input[0], src.name
        key = keys.get(b)
        if key is None or readers.get(b) != 1 or per_key[key] != 1 or b in outputs:
            continue  # not a checkpoint weight, or one read elsewhere too (a tied embedding): stays float
        planned[key] = Planned(b, key, n.name, transpose)
    return planned, head, adapter


def quantize_into(
    f: Any, planned: Planned, t: torch.Tensor, spec: Quantization, end: int, what: str
) -> tuple[int, bool]:
    """Quantize the checkpoint tensor `t` of `planned` and append its arrays to the open data file `f` at `end`
    (page-aligned); the new end, and whether it was quantized (False: the quantizer left it float)."""
    a = t.detach().numpy()  # fp32 or fp16: export_streamed refuses bf16 before it starts
    if planned.transpose is None:
        a = a.T  # (N, K): a slice of output columns is a slice of rows
    n, k = a.shape
    step = max(1, SLICE_BYTES // max(1, k * a.itemsize))
    for start in range(0, n, step):
        part = quantize_weight(np.ascontiguousarray(a[start : start + step].T), spec, what)
        if part is None:
            return end, False
        rows = part.attrs["N"]
        if start == 0:  # the places of the whole weight's arrays: each slice's are rows of them
            for role, array in part.tensors.items():
                end = -(-end // ALIGN) * ALIGN
                whole = _whole_shape(array.shape, rows, n)
                elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
                planned.places[role] = (end, array.nbytes // rows * n, whole, elem)
                end += array.nbytes // rows * n
            planned.written = QuantizedWeight({**part.attrs, "N": n}, part.domain, dict.fromkeys(part.tensors))
        for role, array in part.tensors.items():
            raw = np.ascontiguousarray(array)
            f.seek(planned.places[role][0] + start * (raw.nbytes // rows))
            f.write(memoryview(raw).cast("B"))
        del part
    return end, True


def _whole_shape(shape: tuple[int, ...], rows: int, n: int) -> tuple[int, ...]:
    """The shape of a MatMulNBits array for `n` output columns, from its shape for `rows` of them (first axis the
    column, or flat, column-major)."""
    if shape[0] == rows:
        return (n, *shape[1:])
    assert len(shape) == 1 and shape[0] % rows == 0, shape
    return (shape[0] // rows * n,)


def rewrite(proto: onnx.ModelProto, planned: dict[str, Planned], data_name: str, spec: Quantization) -> int:
    """Each quantized MatMul of `planned` as a MatMulNBits node reading its arrays from `data_name` (external
    initializers), its Transpose and float weight gone; returns how many."""
    graph = proto.graph
    left = {p.name: p.places["float"][0] for p in planned.values() if p.written is None}
    for t in graph.initializer:  # left float by the quantizer: written after the others
        if t.name in left:
            for e in t.external_data:
                if e.key == "offset":
                    e.value = str(left[t.name])
    done = {p.matmul: p for p in planned.values() if p.written is not None}
    if not done:
        return 0
    gone_nodes = {p.transpose for p in done.values() if p.transpose}
    gone_inits = {p.name for p in done.values()}
    nodes = []
    for n in graph.node:
        if n.name in gone_nodes:
            continue
        p = done.get(n.name)
        if p is None:
            nodes.append(n)
            continue
        assert p.written is not None
        inputs = [n.input[0], *(f"{p.name}_{role}" for role in p.written.tensors)]
        q = onnx.helper.make_node(
            "MatMulNBits", inputs, list(n.output), name=f"{n.name}_Q{spec.bits}", domain=p.written.domain,
            **p.written.attrs,
        )  # fmt: skip
        q.metadata_props.extend(n.metadata_props)  # the module path: the block-wise check cuts by it
        nodes.append(q)
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name not in gone_inits]
    for p in done.values():
        for role, (offset, length, shape, elem) in p.places.items():
            t = onnx.TensorProto(name=f"{p.name}_{role}", data_type=elem, dims=shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(done)


def report(
    proto: onnx.ModelProto, planned: dict[str, Planned], spec: Quantization, head: list[str], adapter: list[str],
    what: str,
) -> QuantReport:  # fmt: skip
    """What was done, checked (every adapter tensor a float initializer, read by no MatMulNBits) and written to the
    model's metadata (`META`)."""
    quantized = sum(n.op_type == "MatMulNBits" for n in proto.graph.node)
    if quantized == 0:
        raise SurgeryError(
            f"{what}: --quantize found no MatMul to quantize (no weight has {spec.block_size} rows or more, or "
            "none is a constant); lower --block-size or export without --quantize"
        )
    adapters = {t.name for t in proto.graph.initializer if _is_adapter(t.name)}
    names = {f"{p.matmul}_Q{spec.bits}": p.name for p in planned.values() if p.written is not None}
    weights = {n.output[0]: names[n.name] for n in proto.graph.node if n.name in names}
    result = QuantReport(
        spec,
        quantized,
        sum(n.op_type == "MatMul" for n in proto.graph.node),
        sum(any(_is_adapter(x) for x in n.input) for n in proto.graph.node),
        float_adapters(proto, what, adapters),
        record=Record.of(proto, weights, adapters, adapter, head),
    )
    proto.metadata_props.append(onnx.StringStringEntryProto(key=META, value=result.to_metadata()))
    return result


def dequantized(planned: Planned, data: Path, dtype: torch.dtype) -> torch.Tensor:
    """The weight `planned` multiplies by, read back from the written data file, in the checkpoint's layout."""
    assert planned.written is not None
    arrays = []
    for role in planned.written.tensors:
        offset, length, shape, elem = planned.places[role]
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        arrays.append(np.fromfile(data, dtype=np_dtype, count=length // np.dtype(np_dtype).itemsize, offset=offset))
        arrays[-1] = arrays[-1].reshape(shape)
    w = torch.from_numpy(dequantize_blocks(planned.written.attrs, *arrays))  # (K, N)
    return (w.T if planned.transpose is not None else w).contiguous().to(dtype)


def at_level(proto: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of `proto` with every MatMulNBits at accuracy level `level`."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    return model
