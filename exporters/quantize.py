"""Quantized bases: the base model's MatMul weights as `MatMulNBits` (int4 or int8 blocks), the adapters in float.

ONNX Runtime's `MatMulNBitsQuantizer` quantizes every MatMul whose weight is an initializer, and an adapter's
tensor (a baked bottleneck's, a swappable slot's, a routed stack's) is one. So every node that reads an adapter
tensor is named in `nodes_to_exclude`, and `float_adapters` checks afterwards that each adapter tensor is still a
float initializer read by no quantized node.

The check against torch runs torch with the same quantized weights: `dequantized` reads each `MatMulNBits` node's
blocks, scales and zero points back into floats, `(q - zero_point) * scale` per block of `block_size` rows, finds
the torch parameter the original MatMul weight came from (equal values, as stored or transposed), and puts the
dequantized values there. At accuracy level 0 or 1 ONNX Runtime multiplies in fp32 and the usual tolerance holds;
at level 4 it quantizes the activations to int8 per block as well, which no weight-only reference reproduces, so
that level is held to `LEVEL4_TOLERANCES`. The distance from the float model is measured and reported beside it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from exporters.quantization import LEVEL4_TOLERANCES as LEVEL4_TOLERANCES  # the settings live there
from exporters.quantization import Quantization
from surgery.errors import SurgeryError
from surgery.parity import Parity
from surgery.sites import ADAPTER_ROOT

META = "surgery.quantization"  # the ONNX metadata key: JSON of `Quantization.to_json()` and the counts
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
AT_FP32 = " at fp32 compute with the same quantized weights"


@dataclass(frozen=True)
class Record:
    """The names behind a quantization's counts: each quantized weight (the float initializer it replaced, by the
    MatMulNBits node that reads it now), each MatMul left float and why, and every adapter tensor (all float)."""

    quantized: dict[str, str]  # MatMulNBits node -> the float weight initializer it replaced
    float_adapter: tuple[str, ...] = ()  # MatMul/Gemm nodes that read an adapter tensor (excluded)
    float_head: tuple[str, ...] = ()  # the MatMuls that write an output, with --float-head
    float_other: tuple[str, ...] = ()  # MatMuls whose weight is not a constant (attention), or is shared
    adapter_tensors: tuple[str, ...] = ()  # the adapter initializers: slots, stacks, baked bottlenecks
    gguf: dict[str, Any] | None = None  # a GGUF source: the weights carried from its blocks (exporters/gguf_carry.py)

    def to_json(self) -> dict[str, Any]:
        return {
            **({"gguf": self.gguf} if self.gguf is not None else {}),
            "quantized_weights": dict(sorted(self.quantized.items())),
            "float_nodes": {
                "adapter": sorted(self.float_adapter),
                "head": sorted(self.float_head),
                "other": sorted(self.float_other),
            },
            "adapter_tensors": sorted(self.adapter_tensors),
        }

    @classmethod
    def of(
        cls, model: onnx.ModelProto, weights: dict[str, str], adapters: set[str], excluded: list[str], head: list[str]
    ) -> Record:
        """The record of `model` (quantized): `weights` {output of a MatMul before quantization: its weight
        initializer}, `excluded` the nodes that read an adapter tensor, `head` those kept float by --float-head."""
        quantized = {
            n.name: weights.get(n.output[0].removesuffix("_pre_reshape"), n.input[1])
            for n in model.graph.node
            if n.op_type == "MatMulNBits"
        }
        excluded_set, head_set = set(excluded), set(head)
        floats = [n.name for n in model.graph.node if n.op_type == "MatMul"]
        return cls(
            quantized,
            tuple(n for n in excluded if n),
            tuple(n for n in floats if n in head_set and n not in excluded_set),
            tuple(n for n in floats if n not in head_set and n not in excluded_set),
            tuple(sorted(adapters)),
        )


def read_record(model: onnx.ModelProto) -> dict[str, Any] | None:
    """What a quantized model's metadata (`META`) says was done, or None for a float model."""
    text = {p.key: p.value for p in model.metadata_props}.get(META)
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class QuantReport:
    """What one quantization did: the settings, the MatMuls quantized and the adapter nodes left float."""

    quantization: Quantization
    quantized: int  # MatMulNBits nodes written
    kept_float: int  # MatMul nodes left float: adapters, the head where asked, weights that are not initializers
    adapter_nodes: int  # nodes excluded because they read an adapter tensor
    adapter_tensors: int  # adapter initializers, all float (checked)
    reference: Parity | None = None  # levels 2 to 4: the same model at fp32 compute against the dequantized weights
    from_float: dict[str, float] = field(default_factory=dict)  # measured distance from the float model in torch
    record: Record | None = None  # which weights and nodes: the names

    def _written(self) -> dict[str, Any]:
        """The settings, counts and names: the model's metadata, and the start of `to_json`."""
        return {
            **self.quantization.to_json(),
            "quantized_matmuls": self.quantized,
            "float_matmuls": self.kept_float,
            "adapter_nodes_excluded": self.adapter_nodes,
            **(self.record.to_json() if self.record is not None else {}),
        }

    def to_metadata(self) -> str:
        return json.dumps(self._written(), sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        return {
            **self._written(),
            "adapter_tensors_float": self.adapter_tensors,
            "from_float": self.from_float,
            "at_fp32": self.reference.to_json() if self.reference is not None else None,
        }


def _is_adapter(name: str) -> bool:
    return name.startswith(ADAPTER_ROOT + ".")


def _head_nodes(graph: onnx.GraphProto) -> list[str]:
    """The MatMuls that write a graph output (a causal LM's lm_head, a classifier's last projection)."""
    outputs = {o.name for o in graph.output}
    made = {n.output[0]: n for n in graph.node if n.output}
    found = []
    for name in outputs:
        node = made.get(name)
        while node is not None and node.op_type in ("Add", "Reshape", "Cast", "Identity"):  # bias, view
            node = made.get(node.input[0])
        if node is not None and node.op_type == "MatMul":
            found.append(node.name)
    return found


def _quantizer_module() -> Any:
    """ONNX Runtime's `matmul_nbits_quantizer`, imported without the root logger setup its import does (INFO to
    stderr for every library's logger in the process)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return matmul_nbits_quantizer


def adapter_initializers(model: onnx.ModelProto, module: torch.nn.Module | None = None) -> set[str]:
    """The names of `model`'s adapter tensors: initializers named under `adapters.` (baked bottlenecks, slots), and
    initializers equal to an adapter parameter of `module` as stored or transposed (the exporter names a routed
    stack anonymously, `val_123`)."""
    names = {t.name for t in model.graph.initializer if _is_adapter(t.name)}
    if module is None:
        return names
    keys = set()
    for name, p in module.named_parameters():
        if _is_adapter(name) and p.numel() > 1:
            a = p.detach().float().numpy()
            keys.update({_key(a), _key(np.swapaxes(a, -1, -2))} if a.ndim >= 2 else {_key(a)})
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES and len(t.dims) and _key(numpy_helper.to_array(t).astype(np.float32)) in keys:
            names.add(t.name)
    return names


def quantize_model(
    model: onnx.ModelProto, spec: Quantization, what: str, adapters: set[str] | None = None
) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize `model`'s base MatMuls with ONNX Runtime's `MatMulNBitsQuantizer`, every node reading an adapter
    tensor (`adapters`, default `adapter_initializers(model)`) excluded; the quantized model (the input may be
    changed too) and what was done, also written to its metadata (`META`)."""
    from onnxruntime.quantization.quant_utils import QuantFormat

    mnb = _quantizer_module()

    graph = model.graph
    for i, node in enumerate(graph.node):  # exclusion is by node name
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    tensors = adapter_initializers(model) if adapters is None else adapters
    excluded = [n.name for n in graph.node if any(x in tensors or _is_adapter(x) for x in n.input)]
    head = [] if spec.head else _head_nodes(graph)
    exclude = excluded + head
    inits = {t.name for t in graph.initializer}
    weights = {n.output[0]: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    carried = None
    if spec.gguf is not None and spec.block_size == 32 and spec.symmetric:
        from exporters.gguf_carry import carry

        carried = carry(model, spec.bits, spec.accuracy_level, spec.gguf, set(exclude))
    adapter_matmuls = [n.name for n in graph.node if n.name in set(excluded) and n.op_type in ("MatMul", "Gemm")]
    options = dict(quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    if spec.algorithm == "default":
        config = mnb.DefaultWeightOnlyQuantConfig(
            block_size=spec.block_size,
            is_symmetric=spec.symmetric,
            accuracy_level=spec.accuracy_level or None,
            bits=spec.bits,
            **options,
        )
    elif spec.algorithm == "hqq":
        config = mnb.HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=spec.bits, **options)
    elif spec.algorithm == "rtn":
        config = mnb.RTNWeightOnlyQuantConfig(**options)
    else:
        config = mnb.KQuantWeightOnlyQuantConfig(**options)
    quantizer = mnb.MatMulNBitsQuantizer(
        model,
        bits=spec.bits,
        block_size=spec.block_size,
        is_symmetric=spec.symmetric,
        accuracy_level=spec.accuracy_level or None,
        nodes_to_exclude=exclude,
        algo_config=config,
    )
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the quantizer logs a line per node at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # rtn and k_quant print a progress bar
            quantizer.process()
    except Exception as exc:  # the quantizer raises many types (asserts, ValueErrors of its kernels)
        raise SurgeryError(
            f"{what}: ONNX Runtime's MatMulNBitsQuantizer failed ({type(exc).__name__}: {exc}); try "
            "--quant-algorithm default"
        ) from exc
    finally:
        logging.disable(previous)
    result = quantizer.model if isinstance(quantizer.model, onnx.ModelProto) else quantizer.model.model
    if spec.algorithm == "hqq" and spec.accuracy_level:  # HQQ's config has no accuracy level: set it on its nodes
        for node in result.graph.node:
            if node.op_type == "MatMulNBits":
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", spec.accuracy_level))
    quantized = sum(n.op_type == "MatMulNBits" for n in result.graph.node)
    gguf = None
    if carried is not None:
        gguf = {**carried.to_json(quantized), "summary": carried.summary(spec.bits, quantized)}
    if quantized == 0:
        raise SurgeryError(
            f"{what}: --quantize found no MatMul to quantize (no weight has {spec.block_size} rows or more, or "
            "none is a constant); lower --block-size or export without --quantize"
        )
    report = QuantReport(
        spec,
        quantized,
        sum(n.op_type == "MatMul" for n in result.graph.node),
        len(excluded),
        float_adapters(result, what, tensors),
        record=replace(Record.of(result, weights, tensors, adapter_matmuls, head), gguf=gguf),
    )
    result.metadata_props.append(onnx.StringStringEntryProto(key=META, value=report.to_metadata()))
    return result, report


def float_adapters(model: onnx.ModelProto, what: str, adapters: set[str] | None = None) -> int:
    """Check that every adapter tensor (`adapters`: names; default those under `adapters.`) is still a float
    initializer and that no quantized node reads it or a tensor made from it; returns their count."""
    names = {t.name for t in model.graph.initializer if _is_adapter(t.name)} if adapters is None else adapters
    present = {t.name: t.data_type for t in model.graph.initializer}
    wrong = [f"{name} is gone" for name in sorted(names) if name not in present]
    wrong += [
        f"{name} is not float" for name in sorted(names) if present.get(name, onnx.TensorProto.FLOAT) not in FLOAT_TYPES
    ]
    made_from = {f"{name}{suffix}" for name in names for suffix in ("_Q4", "_Q8", "_scales", "_zero_points")}
    wrong += [
        f"{n.name} reads {x}"
        for n in model.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear")
        for x in n.input
        if x in names or x in made_from or _is_adapter(x)
    ]
    assert not wrong, f"{what}: adapter tensors were quantized: {wrong[:3]}"
    return len(names)


def _unpack(blob: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 bytes -> `count` unsigned values of `bits` each along the last axis, low bits first."""
    if bits == 8:
        return blob[..., :count].astype(np.float32)
    low, high = blob & 0x0F, blob >> 4
    return np.stack([low, high], axis=-1).reshape(*blob.shape[:-1], -1)[..., :count].astype(np.float32)


def dequantize_node(node: onnx.NodeProto, tensors: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The float weight (K, N) a MatMulNBits node multiplies by: `(q - zero_point) * scale` per block of rows."""
    arrays = [numpy_helper.to_array(tensors[x]) if x else None for x in node.input[1:4]]
    return dequantize_blocks(node_attrs(node), *arrays)


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def dequantize_blocks(
    attrs: dict[str, Any], packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None
) -> np.ndarray:
    """The float weight (K, N) of a MatMulNBits node's attributes (K, N, bits, block_size) and tensors."""
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = (k + block - 1) // block
    q = _unpack(packed.reshape(n, blocks, -1), bits, block)  # (N, blocks, B)
    scales = scales.astype(np.float32).reshape(n, blocks, 1)
    if zero_points is not None:
        zp = zero_points
        if zp.dtype == np.uint8:  # packed like the weights, one value per block
            zp = _unpack(zp.reshape(n, -1), bits, blocks)
        zp = zp.astype(np.float32).reshape(n, blocks, 1)
    else:
        zp = np.float32(2 ** (bits - 1))
    w = ((q - zp) * scales).reshape(n, blocks * block)[:, :k]  # (N, K)
    return np.ascontiguousarray(w.T)  # (K, N)


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight through `MatMulNBitsQuantizer` by itself: the node's attributes and domain, its tensors in input
    order (packed blocks, scales, zero points where written) by role."""

    attrs: dict[str, Any]
    domain: str
    tensors: dict[str, Any]  # "Q4" / "Q8", "scales", "zero_points": the arrays (or None: the roles alone)

    def dequantized(self) -> np.ndarray:
        """The float weight (K, N) the node multiplies by."""
        roles = list(self.tensors.values())
        return dequantize_blocks(self.attrs, *roles)


def quantize_weight(w: np.ndarray, spec: Quantization, what: str) -> QuantizedWeight | None:
    """The weight `w` (K, N) of `x @ w` quantized by ONNX Runtime's `MatMulNBitsQuantizer` exactly as it quantizes it
    inside a whole model (the same settings, the same code, one MatMul); None where it leaves it float."""
    from onnx import helper

    k, n = w.shape
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "weight",
        [helper.make_tensor_value_info("x", elem, ["b", k])],
        [helper.make_tensor_value_info("y", elem, ["b", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    try:
        result, _ = quantize_model(model, replace(spec, head=True), what, set())
    except SurgeryError:
        return None  # nothing quantized (too few rows for a block)
    node = next(x for x in result.graph.node if x.op_type == "MatMulNBits")
    tensors = {t.name: t for t in result.graph.initializer}
    roles = ("Q", "scales", "zero_points")
    found = {role: numpy_helper.to_array(tensors[x]) for role, x in zip(roles, node.input[1:4]) if x}
    if "Q" in found:
        found[f"Q{spec.bits}"] = found.pop("Q")
        found = {r: found[r] for r in (f"Q{spec.bits}", "scales", "zero_points") if r in found}
    return QuantizedWeight(node_attrs(node), node.domain, found)


def _key(a: np.ndarray) -> tuple:
    return a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def float_weights(model: onnx.ModelProto) -> dict[str, tuple]:
    """{MatMul output: the key of its float weight initializer} of a model before quantization (the quantized node
    writes the same output), so `dequantized` can find the torch parameter each quantized weight came from."""
    inits = {t.name: t for t in model.graph.initializer}
    return {
        n.output[0]: _key(numpy_helper.to_array(inits[n.input[1]]).astype(np.float32))
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and not _is_adapter(n.input[1])
    }


def dequantized(module: torch.nn.Module, quantized: onnx.ModelProto, weights: dict[str, tuple]) -> torch.nn.Module:
    """A copy of `module` whose quantized weights hold the values the quantized model multiplies by."""
    out = copy.deepcopy(module)
    params = {}
    for name, p in out.named_parameters():
        if p.dim() == 2 and p.is_floating_point() and not _is_adapter(name):
            a = p.detach().float().numpy()
            params[_key(a.T)] = (name, True)
            params.setdefault(_key(a), (name, False))
    tensors = {t.name: t for t in quantized.graph.initializer}
    found = dict(out.named_parameters())
    missing = []
    with torch.no_grad():
        for node in quantized.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            key = weights.get(node.output[0].removesuffix("_pre_reshape"))
            if key is None or key not in params:
                missing.append(node.name)
                continue
            name, transposed = params[key]
            w = torch.from_numpy(dequantize_node(node, tensors))
            p = found[name]
            p.copy_((w.T if transposed else w).to(p.dtype))
    assert not missing, f"quantized MatMuls with no torch parameter to dequantize into: {missing[:3]}"
    return out


@dataclass
class Quantized:
    """A quantized export in the making: the model, what was done, and how to build its torch reference."""

    model: onnx.ModelProto
    report: QuantReport
    weights: dict[str, tuple]  # float_weights of the model before quantization

    @classmethod
    def of(cls, model: onnx.ModelProto, spec: Quantization, what: str, module: torch.nn.Module) -> Quantized:
        """`model` exported from `module` (whose adapter parameters locate the adapter tensors), quantized."""
        weights = float_weights(model)
        quantized, report = quantize_model(model, spec, what, adapter_initializers(model, module))
        return cls(quantized, report, weights)

    def reference(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` (the exported one, or any that shares its base weights) with the quantized weights."""
        return dequantized(module, self.model, self.weights)

    def checked(self, exact: Parity | None, from_float: Parity) -> QuantReport:
        """The report with the check at fp32 compute (levels 2 to 4) and the measured distance from the float
        model."""
        distance = {"max_abs_diff": from_float.max_abs_diff, "max_rel_diff": from_float.max_rel_diff}
        return replace(self.report, reference=exact, from_float=distance)

    def check_at_fp32(
        self, check: Callable[[Path, float, float], Parity], module: Any, what: str, external: bool = False
    ) -> Parity | None:
        """Levels 2 to 4: `check(path, atol, rtol)` of the model at fp32 compute, held to the float model's
        tolerance (refused past it); None at levels 0 and 1, where the written model computes in fp32 already."""
        from surgery.parity import tolerances, weights_dtype

        if self.report.quantization.accuracy_level in (0, 1):
            return None
        atol, rtol = tolerances(weights_dtype(module))
        with self.at_fp32(external) as path:
            parity = check(path, atol, rtol)
        if not parity.ok:
            raise SurgeryError(
                f"{what}: ONNX Runtime differs from torch{AT_FP32} by more than --atol + --rtol x max|torch| allow: "
                f"{parity.summary()}; nothing was written"
            )
        return parity

    @contextmanager
    def at_fp32(self, external: bool = False) -> Iterator[Path]:
        """The quantized model with every MatMulNBits at accuracy level 1 (fp32 activations), in a temporary file:
        its check against the dequantized reference holds the weights to the float tolerance."""
        from exporters.onnx_files import save_onnx

        model = copy.deepcopy(self.model)
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", 1)])
        with tempfile.TemporaryDirectory(prefix="surgery-fp32-") as folder:
            path = Path(folder) / "model.onnx"
            save_onnx(model, path, external)
            yield path
