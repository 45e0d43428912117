"""Block-wise verification: a streamed export (exporters/stream.py) checked against torch one transformer block at a
time, so that neither side ever holds the whole model.

Both graphs are cut the same way: the nodes of block i are those whose module path lies in it (`layers.3...`,
adapters included: surgery/meta.py `block_of`); the rest is the prefix (embeddings, masks, rotary angles) and the
suffix (final norm, head). For each part in order, torch runs its piece of the captured graph with only that part's
weights read from the checkpoint, and ONNX Runtime runs the same piece of the exported model (cut out with
`onnx.utils.Extractor`), fed the hidden states torch's previous block produced (and its own prefix's masks and
angles). Each block's output is held to the scale-aware tolerance of surgery/parity.py; a block that fails is
named. The prefix is not compared by itself: an error there shows in block 0, which takes its output.
"""

from __future__ import annotations

import operator
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx
from torch.utils import _pytree as pytree

from exporters.verify import ort_session
from surgery.errors import SurgeryError
from surgery.meta import MetaCaptured, block_of, is_fake
from surgery.parity import ATOL, RTOL, Parity, check_sizes, compare, mask_of, noise_of
from surgery.sites import ADAPTER_ROOT

PREFIX, SUFFIX = 0, 1_000_000  # part numbers: block i is part i + 1
SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's record of a node's module path

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BlockCheck:
    """One part's comparison: `block 3`, or `output` (the suffix, against the model's outputs)."""

    name: str
    parity: Parity
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"part": self.name, "seconds": round(self.seconds, 2), **self.parity.to_json()}


@dataclass(frozen=True)
class BlockwiseReport:
    parts: tuple[BlockCheck, ...]

    @property
    def ok(self) -> bool:
        return all(p.parity.ok for p in self.parts)

    @property
    def failing(self) -> list[str]:
        return [p.name for p in self.parts if not p.parity.ok]

    def summary(self) -> str:
        worst = max(self.parts, key=lambda p: p.parity.share)
        head = "all parts pass" if self.ok else f"failing: {', '.join(self.failing)}"
        return f"{head}; worst {worst.name}: {worst.parity.summary()}"

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "failing": self.failing, "parts": [p.to_json() for p in self.parts]}

    def markdown(self) -> str:
        rows = [
            "| part | max abs diff | of max abs torch | share of the allowance | ok | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for p in self.parts:
            q = p.parity
            rows.append(
                f"| {p.name} | {q.max_abs_diff:.2e} | {q.max_rel_diff:.2e} | {q.share:.2f} | "
                f"{'yes' if q.ok else 'NO'} | {p.seconds:.1f} |"
            )
        return "\n".join(rows)


def _label(part: int) -> str:
    return "prefix" if part == PREFIX else "output" if part == SUFFIX else f"block {part - 1}"


def _assign(nodes: list[Any], block: Callable[[Any], int | None], inputs: Callable[[Any], list[Any]]) -> dict:
    """Part of each node: its block's, else the prefix where nothing it reads comes from a block, else the suffix."""
    part: dict[Any, int] = {}
    for n in nodes:
        b = block(n)
        if b is not None:
            part[n] = b + 1
        else:
            part[n] = PREFIX if all(part.get(a, PREFIX) == PREFIX for a in inputs(n)) else SUFFIX
    return part


# torch: the captured graph cut with fx's split_module


def _fx_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target).removeprefix(ADAPTER_ROOT + ".")
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def split_torch(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` cut into `submod_<part>` calls: the prefix, one per block, the suffix."""
    from torch.fx.passes.split_module import split_module

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    part = _assign(nodes, lambda n: block_of(_fx_path(n)), lambda n: n.all_input_nodes)
    try:
        return split_module(gm, gm, lambda n: part[n], keep_original_order=True)
    except Exception as exc:  # a cycle between parts: a top-level op between blocks
        raise SurgeryError(
            f"block-wise verification cannot cut this graph into blocks ({type(exc).__name__}: {exc}); "
            "verify the whole model instead (export without --stream where it fits in memory)"
        ) from exc


# ONNX: the exported graph cut by the module paths the exporter records on each node


def _onnx_path(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == SCOPES:
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            return scopes[-2] if len(scopes) > 1 else ""
    return ""


@dataclass(frozen=True)
class OnnxPart:
    inputs: list[str]  # values it reads that another part (or the model's input) produces
    outputs: list[str]  # values it produces that a later part reads, or the model returns
    producer: dict[str, int]  # for each input, the part that produces it (-1: a model input)


def split_onnx(graph: onnx.GraphProto) -> dict[int, OnnxPart]:
    """The parts of an exported graph: for each, its boundary values."""
    init = {i.name for i in graph.initializer}
    made: dict[str, onnx.NodeProto] = {o: n for n in graph.node for o in n.output}
    nodes = list(graph.node)
    part_of: dict[int, int] = {}
    for n in nodes:
        b = block_of(_onnx_path(n))
        before = [part_of[id(made[i])] for i in n.input if i in made]
        if b is not None:
            part_of[id(n)] = b + 1
        elif not any(prop.key == SCOPES for prop in n.metadata_props):
            part_of[id(n)] = max(before, default=PREFIX)  # made by the optimizer (GPT-2's Split): with its inputs
        else:
            part_of[id(n)] = PREFIX if all(p == PREFIX for p in before) else SUFFIX
    graph_out = {o.name for o in graph.output}
    parts: dict[int, OnnxPart] = {}
    for k in sorted(set(part_of.values())):
        mine = [n for n in nodes if part_of[id(n)] == k]
        produced = {o for n in mine for o in n.output}
        ins, producer = [], {}
        for n in mine:
            for i in n.input:
                if i and i not in produced and i not in init and i not in producer:
                    ins.append(i)
                    producer[i] = part_of[id(made[i])] if i in made else -1
        read_later = {i for n in nodes if part_of[id(n)] != k for i in n.input}
        outs = [o for n in mine for o in n.output if o in read_later or o in graph_out]
        parts[k] = OnnxPart(ins, outs, producer)
    return parts


def _pair(
    got: dict[str, np.ndarray], torch_values: list[torch.Tensor], label: str, named: dict[str, int] | None = None
) -> dict[str, int]:
    """Which torch output each of a part's ONNX outputs is: the model's outputs by name (`named`: a causal LM's
    present.N.key and .value, of one shape), the others the float one of its shape. ONNX outputs without one
    (shape vectors the optimizer shares between blocks) are not compared, and later parts read ONNX's own."""
    floats = [k for k, t in enumerate(torch_values) if t.is_floating_point()]
    pairs = {name: k for name, k in (named or {}).items() if name in got}
    for name, value in got.items():
        if not np.issubdtype(value.dtype, np.floating) or name in pairs:
            continue
        same = [k for k in floats if tuple(torch_values[k].shape) == value.shape and k not in pairs.values()]
        if len(same) > 1:
            raise SurgeryError(
                f"block-wise verification: {label} returns {len(same)} values of shape {list(value.shape)}; "
                "which is which is unknown: verify the whole model instead"
            )
        if same:
            pairs[name] = same[0]
    if sorted(pairs.values()) != floats:
        raise SurgeryError(
            f"block-wise verification: {label}'s torch and ONNX outputs do not pair up by shape; "
            "verify the whole model instead"
        )
    return pairs


def verify_blockwise(
    captured: MetaCaptured,
    path: str | Path,
    *,
    tolerance: float = ATOL,
    rtol: float = RTOL,
    sizes: list[dict[str, int]] | None = None,
    progress: Progress | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
    weights_as: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> BlockwiseReport:
    """Check the ONNX model at `path` against `captured` (a weightless capture, adapters as exported) block by
    block; only one part's weights are in memory at a time, on either side. `overrides`: initializers that ONNX
    Runtime takes with these values instead of the file's (a swappable export's slots, filled by a pack).
    `weights_as(key, tensor)`: the values torch takes for a checkpoint tensor (a quantized export's dequantized
    blocks)."""
    assert captured.checkpoint is not None and captured.keys is not None
    path = Path(path)
    sig = captured.signature
    sizes = sizes or check_sizes(sig)
    batches = [sig.examples(s, seed=k + 1, pad=True) for k, s in enumerate(sizes)]
    masks = [mask_of(sig, b) for b in batches]
    top = split_torch(captured.gm)
    model = onnx.load(str(path), load_external_data=False)
    parts = split_onnx(model.graph)
    extractor = onnx.utils.Extractor(_typed(model))  # the boundary values typed
    ids = {id(p): n for n, p in captured.gm.named_parameters()}
    torch_env: list[dict[fx.Node, Any]] = [{} for _ in batches]
    ort_env: list[dict[str, np.ndarray]] = [{} for _ in batches]
    checks: list[BlockCheck] = []
    placeholders = [n for n in top.graph.nodes if n.op == "placeholder"]
    named = _named_outputs(top, sig.outputs)
    for env, tensors in zip(torch_env, batches):
        env.update({p: t for p, t in zip(placeholders, tensors)})
    for oenv, tensors in zip(ort_env, batches):
        oenv.update({name: _numpy(t) for name, t in zip(sig.names, tensors)})
    for node in top.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            for env in torch_env:
                env[node] = env[node.args[0]][node.args[1]]
            continue
        if node.op == "output":
            break
        if node.op != "call_module":
            continue
        k = int(str(node.target).removeprefix("submod_"))
        label = _label(k)
        if progress is not None:
            progress(label)
        start = time.perf_counter()
        weights = _weights(top, node, captured, ids, weights_as)
        submod = top.get_submodule(str(node.target))
        outs_t = []
        with torch.no_grad():
            for env in torch_env:
                args = [weights[a] if a in weights else env[a] for a in node.args]
                out = submod(*args)
                env[node] = out
                outs_t.append(_leaves(out))
        del weights, args  # args holds the last call's weights: this part's tensors go before its ORT session comes
        part = parts.get(k)
        if part is None:
            continue
        session = _part_session(extractor, part, path, overrides or {})
        got = []
        for oenv in ort_env:
            feeds = {i: oenv[i] for i in part.inputs if i in {x.name for x in session.get_inputs()}}
            values = session.run(part.outputs, feeds)
            got.append(dict(zip(part.outputs, values)))
        del session
        for oenv, g in zip(ort_env, got):
            oenv.update(g)  # ORT's own masks, angles and shapes, and block 0's input
        if k == PREFIX:
            continue
        # later parts read torch's values (the hidden states torch's block produced); compare this part's
        pairs = _pair(got[0], outs_t[0], label, named.get(node))
        names = list(pairs)
        result = None
        for b, (oenv, g) in enumerate(zip(ort_env, got)):
            for name, t_index in pairs.items():
                oenv[name] = _numpy(outs_t[b][t_index])
            ref = [outs_t[b][pairs[n]] for n in names]
            where = f"{label}, shape {sizes[b]}"
            one = compare(
                ref, [g[n] for n in names], atol=tolerance, rtol=rtol, names=names, mask=masks[b], where=where
            )
            if not one.ok:  # within this block's own torch noise? (its weights read again, as before)
                weights = _weights(top, node, captured, ids, weights_as)
                args = [weights[a] if a in weights else torch_env[b][a] for a in node.args]
                noise, how = noise_of(submod, lambda m, a: _leaves(m(*a)), args)
                del weights, args
                one = compare(
                    ref, [g[n] for n in names], atol=tolerance, rtol=rtol, names=names, mask=masks[b], where=where,
                    noise=[noise[pairs[n]] for n in names], how=how,
                )  # fmt: skip
            one = replace(one, shapes=[sizes[b]])
            result = one if result is None else result.combine(one)
        assert result is not None
        checks.append(BlockCheck(label, result, time.perf_counter() - start))
    return BlockwiseReport(tuple(checks))


def _leaves(out: Any) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _named_outputs(top: fx.GraphModule, names: tuple[str, ...]) -> dict[fx.Node, dict[str, int]]:
    """For each part's call, the model outputs it returns: {output name: index among the part's outputs}."""
    out = next(n for n in top.graph.nodes if n.op == "output")
    named: dict[fx.Node, dict[str, int]] = {}
    for name, leaf in zip(names, pytree.tree_leaves(out.args[0])):
        if not isinstance(leaf, fx.Node):
            continue
        if leaf.op == "call_module":
            named.setdefault(leaf, {})[name] = 0
        elif leaf.target is operator.getitem and isinstance(leaf.args[0], fx.Node):
            named.setdefault(leaf.args[0], {})[name] = int(leaf.args[1])  # type: ignore[arg-type]
    return named


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A torch value as ONNX Runtime takes it: bf16 as fp32 (a bf16 model runs as its fp32 copy on the CPU)."""
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the types of its values inferred. onnx's shape inference knows no `com.microsoft` op: each
    MatMulNBits (a quantized export) is inferred as the MatMul by a (K, N) weight it computes."""
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nbits:
        return onnx.shape_inference.infer_shapes(model)
    shadow = onnx.ModelProto()
    shadow.CopyFrom(model)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    del shadow.graph.node[:]
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            shadow.graph.node.append(n)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        weight = f"{n.name}.shape_of_weight"
        kn = [attrs["K"], attrs["N"]]
        shadow.graph.input.append(onnx.helper.make_tensor_value_info(weight, inits[n.input[2]], kn))
        shadow.graph.node.append(onnx.helper.make_node("MatMul", [n.input[0], weight], list(n.output), name=n.name))
    typed = onnx.shape_inference.infer_shapes(shadow)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.value_info.extend(typed.graph.value_info)
    return out


def _weights(
    top: fx.GraphModule, node: fx.Node, captured: MetaCaptured, ids: dict[int, str],
    weights_as: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict:  # fmt: skip
    """The real tensors of the get_attr arguments of one part's call: fake weights read from the checkpoint (as
    `weights_as` gives them, where given)."""
    assert captured.checkpoint is not None and captured.keys is not None
    attrs = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    weights: dict[fx.Node, torch.Tensor] = {}
    wanted: dict[str, list[fx.Node]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for a in attrs:
        t = top.get_parameter(str(a.target)) if _is_param(top, str(a.target)) else top.get_buffer(str(a.target))
        if is_fake(t):
            key = captured.keys[ids.get(id(t), str(a.target))]
            wanted.setdefault(key, []).append(a)
            dtypes[key] = t.dtype
        else:
            weights[a] = t
    for key, t in captured.checkpoint.read(dtypes):
        if weights_as is not None:
            t = weights_as(key, t)
        for a in wanted[key]:
            weights[a] = t
    return weights


def _is_param(module: torch.nn.Module, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    return name in (module.get_submodule(owner) if owner else module)._parameters


def _part_session(extractor: Any, part: OnnxPart, path: Path, overrides: dict[str, torch.Tensor]) -> Any:
    """An ONNX Runtime session of one part, cut from the model; its weights are read from the model's data file,
    but for the initializers `overrides` names, which take those values."""
    sub = extractor.extract_model(part.inputs, part.outputs)
    for init in sub.graph.initializer:
        if init.name in overrides:
            init.CopyFrom(_tensor_proto(init.name, overrides[init.name]))
    # beside the model, so that its references to NAME.onnx.data resolve (onnx refuses links and `..`)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.part-", suffix=".onnx", dir=path.parent)
    piece = Path(name)
    try:
        os.close(fd)
        onnx.save(sub, str(piece))
        return ort_session(piece)
    finally:
        piece.unlink(missing_ok=True)


def _tensor_proto(name: str, t: torch.Tensor) -> onnx.TensorProto:
    """A torch tensor as an initializer of its own dtype (bf16 included, which numpy lacks)."""
    from onnx import numpy_helper

    if t.dtype != torch.bfloat16:
        return numpy_helper.from_array(t.detach().contiguous().numpy(), name)
    raw = t.detach().contiguous().view(torch.int16).numpy().tobytes()
    return onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, list(t.shape), raw, raw=True)
