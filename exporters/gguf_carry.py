"""A GGUF source's Q4_0 and Q8_0 blocks carried into `MatMulNBits` as they are, with no second rounding.

llama.cpp's Q4_0 block holds 32 weights as an fp16 scale `d` and 4-bit `q` in 0..15, value `d·(q − 8)`; Q8_0 holds an
fp16 `d` and int8 `q`, value `d·q`. `MatMulNBits` at block 32 with no zero-point input computes `(q − 8)·scale` for
4 bits and `(q − 128)·scale` for 8 bits (its default zero points), so each Q4_0 block is its own 4-bit block (the
values re-packed two to a byte, even index in the low nibble, where Q4_0 puts values 0..15 in the low nibbles and
16..31 in the high ones) and each Q8_0 block an 8-bit one (`q + 128` as uint8), with `scale = d` widened to the
model's float type: exact. Both are blocks along the input features (the GGUF row), one row per output feature,
which is `MatMulNBits`' layout.

Which weight is which tensor: transformers dequantizes the GGUF (gguf's own `dequantize`), renames and may permute
rows (Llama's q and k), so each output column of an ONNX MatMul weight is looked up by its exact values among the
dequantized rows of the GGUF's Q4_0 (int4) or Q8_0 (int8) tensors; a weight whose every column is found in one
tensor is carried, rows in the order found. The others (other block types: Q4_1, K-quants, F16) go to ONNX Runtime's
quantizer, which rounds their dequantized values again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

BLOCK = 32
CARRIED = {4: "Q4_0", 8: "Q8_0"}  # the block type each width carries


@dataclass
class Carry:
    """What carrying did: {MatMulNBits node: GGUF tensor}, and the block types of the GGUF's matrices by count."""

    carried: dict[str, str] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)  # block type: matrices of it in the file
    file: str = ""

    def to_json(self, quantized: int) -> dict[str, Any]:
        return {
            "file": self.file,
            "carried": dict(sorted(self.carried.items())),
            "requantized": quantized - len(self.carried),
            "types": dict(sorted(self.types.items())),
        }

    def summary(self, bits: int, quantized: int) -> str:
        """One line: what was carried, what was rounded again."""
        others = ", ".join(f"{t} x{n}" for t, n in sorted(self.types.items()) if t != CARRIED[bits])
        return (
            f"{len(self.carried)} weights carried from the GGUF's {CARRIED[bits]} blocks unrounded; "
            f"{quantized - len(self.carried)} requantized from their dequantized values"
            + (f" (the GGUF's other matrices: {others})" if others else "")
        )


def _key(row: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest()


def _index(path: Path, bits: int) -> tuple[dict[str, tuple[str, int]], dict[str, Any], dict[str, int]]:
    """{row key: (tensor, row)} of the GGUF's tensors of the carried type, those tensors' raw blocks (rows, bytes),
    and the block types of its matrices by count."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    wanted = getattr(gguf.GGMLQuantizationType, CARRIED[bits])
    index: dict[str, tuple[str, int]] = {}
    raw: dict[str, Any] = {}
    types: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.tensor_type != wanted:
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # (rows, K), as transformers computes them
        for r in range(values.shape[0]):
            index.setdefault(_key(values[r]), (t.name, r))
        raw[t.name] = t.data  # (rows, bytes), memory-mapped
    return index, raw, types


def _blocks(rows: np.ndarray, bits: int, k: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """GGUF rows (N, bytes) of Q4_0 / Q8_0 blocks -> MatMulNBits' packed (N, K/32, 32·bits/8) uint8 and scales
    (N, K/32) in `dtype`."""
    n, blocks = rows.shape[0], k // BLOCK
    per = rows.reshape(n, blocks, -1)
    d = per[..., :2].copy().view(np.float16).reshape(n, blocks)
    body = per[..., 2:]
    if bits == 8:
        q = (body.view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # zero point 128
    else:
        q = np.concatenate([body & 0x0F, body >> 4], axis=-1)  # Q4_0: values 0..15 low nibbles, 16..31 high
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: even index in the low nibble
    return np.ascontiguousarray(q), d.astype(dtype)


def carry(model: onnx.ModelProto, bits: int, accuracy_level: int, path: str | Path, skip: set[str]) -> Carry:
    """Replace in `model` each MatMul (not in `skip`: adapter and kept-float nodes) whose float weight is a tensor
    of `path`'s carried block type by a MatMulNBits node of those blocks; what was done."""
    path = Path(path)
    index, raw, types = _index(path, bits)
    done = Carry(types=types, file=path.name)
    if not index:
        return done
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    drop: set[str] = set()
    added: list[onnx.TensorProto] = []
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.name in skip or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(t.dims) != 2:
            continue
        w = numpy_helper.to_array(t)  # (K, N)
        k, n = w.shape
        if k % BLOCK:
            continue
        found = [index.get(_key(w[:, c].astype(np.float32))) for c in range(n)]
        if any(f is None for f in found) or len({f[0] for f in found}) != 1:  # type: ignore[index]
            continue
        name = found[0][0]  # type: ignore[index]
        rows = np.asarray(raw[name])[[f[1] for f in found]]  # type: ignore[index]
        q, scales = _blocks(rows, bits, k, w.dtype)
        weight = node.input[1]
        attrs = dict(K=k, N=n, bits=bits, block_size=BLOCK)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        q_node = onnx.helper.make_node(
            "MatMulNBits", [node.input[0], f"{weight}_Q{bits}", f"{weight}_scales"], list(node.output),
            name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs,
        )  # fmt: skip
        q_node.metadata_props.extend(node.metadata_props)
        graph.node[i].CopyFrom(q_node)
        added += [numpy_helper.from_array(q, f"{weight}_Q{bits}"), numpy_helper.from_array(scales, f"{weight}_scales")]
        if readers.get(weight) == 1:
            drop.add(weight)
        done.carried[q_node.name] = name
    if done.carried:
        kept = [t for t in graph.initializer if t.name not in drop]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *added])
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done
