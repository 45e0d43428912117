"""Insertion sites: where in the graph an adapter goes.

Every node of a captured graph carries `meta["nn_module_stack"]`, whose entries name the modules it was
traced in (`encoder.layer.0.attention.output.dense`). A site is a module's output node, found three ways:

1. `--targets REGEX`: every linear module whose path matches (`re.search`).
2. The architecture table (`surgery/architectures.py`) for known families: each layer's attention output
   projection, feed-forward output (and a decoder's cross-attention output), by module path.
3. The graph rule, for anything else (`graph_rule_sites`): the output of a sublayer that is added to the
   residual stream, through dropout or a norm. It finds the table's sites on every family the table knows.

Adapters that sit beside a computation rather than after it (LoRA beside a projection, the parallel adapter
beside the feed-forward block) also take that computation's input: `projection_sites` and `parallel_sites`
fill a site's `input` (the node) and `input_path` (the module whose input it is). Projections are named per
architecture in the table (q, k, v, o, ffn_in, ffn_gate, ffn_out); a fused projection (GPT-2's `c_attn`)
gives each of q, k, v a `part` (i, n): the i-th of n equal slices of its output.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx

from surgery.architectures import (
    ATTN_OUT,
    CROSS_OUT,
    FFN_OUT,
    architecture,
    block_of,
    lora_matches,
    match,
    parallel_matches,
)
from surgery.errors import SurgeryError

aten = torch.ops.aten

TARGET, RESIDUAL = "target", "residual"
ADAPTER_ROOT = "adapters"

LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default}
PASS_THROUGH = {
    aten.dropout.default,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten.view.default,
    aten.reshape.default,
    aten._to_copy.default,
    aten.to.dtype,
}
ADD_OPS = {aten.add.Tensor, aten.add_.Tensor, operator.add}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, operator.mul, operator.truediv}

# Where else a bottleneck can sit, relative to the residual add `a = y + x` after a sublayer output `y` and, in a
# post-LN block, the norm `z = LN(a)` after it (the placements of AdapterHub's `adapters`, surgery/adapterhub.py):
AFTER_ADD = "after_add"  # `node` is the add a: a + f(a), the adapter on the residual stream (pre-LN, GPT-2)
AFTER_NORM = "after_norm"  # `node` is the norm z: z + f(z), after the block's output norm (post-LN, BERT)
BEFORE_NORM = (
    "before_norm"  # `node` is y, `input` z: LN(y + f(z) + x), the norm applied again (graph.insert_before_norm)
)
FORMS = (AFTER_ADD, AFTER_NORM, BEFORE_NORM)


@dataclass(frozen=True)
class Site:
    """One insertion point: the output of the module at `path`, of width `width` (d_model).

    An adapter beside a computation also takes its input: node `input`, the input of module `input_path`,
    of width `d_in`. On a fused projection `part` (i, n) is the slice of the output the site stands for
    (`width` is then the slice's width).
    """

    path: str  # module path, e.g. encoder.layer.0.attention.output.dense
    layer: int  # Transformer layer index
    role: str  # attn_out | ffn_out | target | residual | q | k | v | o | ffn_in | ffn_gate
    width: int  # size of the output's last axis
    node: str  # name of the graph node whose value the adapter takes
    input: str | None = None  # name of the input node, for adapters beside a computation (LoRA, parallel)
    input_path: str | None = None  # the module whose input that is
    d_in: int | None = None  # size of the input's last axis
    part: tuple[int, int] | None = None  # (i, n): the i-th of n equal slices of a fused projection's output
    form: str | None = None  # None: the adapter follows `node`; else one of FORMS (AdapterHub's placements)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["form"] is None:  # the JSON of earlier versions, for every site but AdapterHub's placements
            del d["form"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Site:
        part = d.get("part")
        return cls(**{**d, "part": tuple(part) if part is not None else None})


def module_path(node: fx.Node) -> str | None:
    """The innermost module a node was traced in, or None for nodes outside any module."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _in_module(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(p == path for p, _ in stack.values())


def output_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The single node that carries the output of module `path` out of it."""
    inside = [n for n in gm.graph.nodes if _in_module(n, path)]
    members = set(inside)
    outs = [n for n in inside if _is_tensor(n) and any(u not in members for u in n.users)]
    if len(outs) != 1:
        raise SurgeryError(
            f"module {path}: expected one output node in the graph, found {len(outs)} "
            f"({', '.join(n.format_node() or n.name for n in outs[:3])}); a module called twice or returning "
            "several tensors cannot take an adapter; choose another with --targets"
        )
    return outs[0]


def linear_modules(gm: fx.GraphModule) -> list[str]:
    """Paths of modules that compute a linear projection, in graph order (adapters excluded)."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_OPS:
            path = module_path(node)
            if path and not path.startswith(ADAPTER_ROOT + "."):
                seen.setdefault(path)
    return list(seen)


def _layer_index(path: str) -> int:
    m = re.search(r"\.(\d+)(\.|$)", path)
    return int(m.group(1)) if m else 0


def _site(gm: fx.GraphModule, path: str, layer: int, role: str) -> Site:
    node = output_node(gm, path)
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        raise SurgeryError(f"module {path}: its output {node.name} is not a tensor; choose another with --targets")
    return Site(path=path, layer=layer, role=role, width=int(val.shape[-1]), node=node.name)


def module_paths(gm: fx.GraphModule) -> list[str]:
    """Paths of every module the graph's nodes were traced in, in graph order (adapters excluded)."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path and not path.startswith(ADAPTER_ROOT + "."):
                seen.setdefault(path)
    return list(seen)


def find_sites(gm: fx.GraphModule, model_type: str | None = None, targets: str | None = None) -> list[Site]:
    """All sites of the graph: by `targets` regex if given, else by the architecture table, else by the graph rule."""
    candidates = linear_modules(gm)
    if targets is not None:
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise SurgeryError(f"--targets {targets!r} is not a valid regular expression ({exc})") from exc
        paths = [p for p in candidates if pattern.search(p)]
        if not paths:
            raise SurgeryError(
                f"--targets {targets!r} matches none of the {len(candidates)} linear modules "
                f"(e.g. {', '.join(candidates[:3])}); run `surgery inspect` to list them"
            )
        return [_site(gm, p, _layer_index(p), TARGET) for p in paths]
    arch = architecture(model_type)
    if arch is not None:
        sites = [_site(gm, m.path, m.layer, m.role) for m in match(module_paths(gm), arch.roles, arch.roles)]
    else:
        sites = graph_rule_sites(gm)
    if not sites:
        how = f"the {model_type} table entry" if arch else "the graph rule (a sublayer output added to the residual)"
        raise SurgeryError(f"no insertion sites found by {how}; name the modules with --targets REGEX")
    return sites


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_OPS


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _data_users(node: fx.Node) -> list[fx.Node]:
    """The users that take `node`'s value, not the shape and dtype checks torch.export leaves beside it."""
    return [u for u in node.users if u.users or _is_tensor(u)]


def _stack(node: fx.Node) -> list[tuple[str, Any]]:
    return list((node.meta.get("nn_module_stack") or {}).values())


def _shape(node: Any) -> Any:
    return getattr(node.meta.get("val"), "shape", None) if isinstance(node, fx.Node) else None


class _Modules:
    """The graph's nodes by module path (every module of each node's stack, not only the innermost)."""

    def __init__(self, gm: fx.GraphModule):
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.members: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                if path and not path.startswith(ADAPTER_ROOT + "."):
                    self.members.setdefault(path, []).append(node)
        self.with_linear = {p for p, nodes in self.members.items() if any(_is_linear(n) for n in nodes)}
        self._outputs: dict[str, fx.Node | None] = {}

    def output(self, path: str) -> fx.Node | None:
        """The single node carrying the module's output out of it; None for a module with several or none."""
        if path not in self._outputs:
            inside = set(self.members[path])
            outs = [n for n in self.members[path] if _is_tensor(n) and any(u not in inside for u in n.users)]
            self._outputs[path] = outs[0] if len(outs) == 1 else None
        return self._outputs[path]

    def norm_around(self, node: fx.Node, user: fx.Node) -> fx.Node | None:
        """If `user` begins a module without projections (a norm, a dropout) that takes `node` alone and gives one
        tensor of its shape, that module's output; else None."""
        own = {p for p, _ in (node.meta.get("nn_module_stack") or {}).values()}
        for path, _ in (user.meta.get("nn_module_stack") or {}).values():
            if path in own or path.startswith(ADAPTER_ROOT + "."):
                continue
            out = self.output(path)  # the outermost module `user` is in and `node` is not
            if path in self.with_linear or out is None or _shape(out) != _shape(node):
                return None
            return out
        return None

    def residual_branch(self, node: fx.Node) -> list[fx.Node] | None:
        """The nodes from `node` to the add that puts it on the residual stream, if it is a branch: every step
        has one user, through dropout, copies, reshapes and norms; the add's other operand has the same shape."""
        chain = [node]
        while len(users := _data_users(node)) == 1:
            user = users[0]
            if user.op != "call_function":
                return None
            if user.target in ADD_OPS:
                other = [a for a in user.args[:2] if a is not node]
                return chain + [user] if other and _shape(other[0]) == _shape(node) else None
            nxt = self.norm_around(node, user) or (user if user.target in PASS_THROUGH or _scales(user, node) else None)
            if nxt is None:
                return None
            node = nxt
            chain.append(node)
        return None


def _scales(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` scales `node` elementwise (`node * c`, `node / c`, `c * node`) by a number, a 0-d tensor or a
    per-channel tensor (ones but for its last axis, as a parameter or a config value): a residual multiplier or a
    depth scale, which keeps the branch a branch. A product with a tensor that varies along the tokens (a gate)
    is not a scale."""
    if user.target not in SCALE_OPS or len(user.args) != 2 or user.args.count(node) != 1:
        return False
    if user.target in (aten.div.Tensor, aten.div.Scalar, operator.truediv) and user.args[0] is not node:
        return False  # c / node is not a scale of node
    other = user.args[1] if user.args[0] is node else user.args[0]
    if isinstance(other, (int, float)):
        return True
    val = other.meta.get("val") if isinstance(other, fx.Node) else None
    return isinstance(val, torch.Tensor) and all(int(n) == 1 for n in val.shape[:-1]) and _shape(user) == _shape(node)


def graph_rule_sites(gm: fx.GraphModule, heads: bool = False) -> list[Site]:
    """Sites found by the graph alone: the output of each sublayer that is added to the residual stream.

    A sublayer is a module computing a projection whose output reaches an add with a tensor of its shape, by a
    path where each node has one user (so it is a branch, not the stream): through dropout, copies, reshapes,
    modules without projections (a norm after the sublayer, Gemma's `o_proj -> post_attention_layernorm -> +`) and
    elementwise scales by a constant, a config value or a per-channel parameter (Granite's
    `residual + out * residual_multiplier`): the site is the unscaled output, so the scale applies to the adapter's
    output as it does to the sublayer's.
    Several modules on one branch are one site, the first on it (the projection, not the attention module around
    it; at one node, the innermost module), so a path that prefixes another never gives a second site. Two
    branches into one add (a parallel block: GPT-J, Falcon, Phi) are two sites; a mixture of experts, whose
    experts are combined before the add, is one (the block's output, of the stream's shape, not the experts'
    module's flattened (tokens, d_model) inside it, nor an add inside the block: Qwen2-MoE's experts plus its
    shared expert). Per block (the path up to its index), two
    sites are `attn_out` and `ffn_out`, three (a decoder block) `attn_out`, `cross_out`, `ffn_out`.
    """
    mods = _Modules(gm)
    found: list[tuple[str, fx.Node]] = []
    for path in mods.with_linear:
        out = mods.output(path)
        if out is not None and (chain := mods.residual_branch(out)) is not None and _shape(out) == _shape(chain[-1]):
            found.append((path, out, chain))  # of the stream's shape: not the experts' (tokens, d) inside a MoE
    sublayers = {path for path, _, _ in found}
    # an add inside another sublayer is not the residual's (Qwen2-MoE's routed experts + its shared expert)
    found = [f for f in found if not any(p in sublayers for p, _ in _stack(f[2][-1]) if p != f[0])]
    found.sort(key=lambda f: (mods.order[f[1]], -f[0].count(".")))
    on_branch: set[fx.Node] = set()
    by_block: dict[str, list[str]] = {}
    for path, out, chain in found:
        if out not in on_branch:
            on_branch.update(chain[:-1])
            by_block.setdefault(block_of(path), []).append(path)
    if not heads and len(by_block) > 1:
        by_block.pop("", None)
    sites = []
    for block, paths in by_block.items():
        roles = {2: [ATTN_OUT, FFN_OUT], 3: [ATTN_OUT, CROSS_OUT, FFN_OUT]}.get(len(paths), [RESIDUAL] * len(paths))
        sites += [_site(gm, p, _layer_index(block or p), role) for p, role in zip(paths, roles)]
    return sites


def head_sites(gm: fx.GraphModule) -> list[Site]:
    """The sites the graph rule leaves out by default: sublayers outside the Transformer's numbered blocks (a
    pooling or classification head with attention or an MLP). `--targets` adds them."""
    kept = {s.node for s in graph_rule_sites(gm)}
    return [s for s in graph_rule_sites(gm, heads=True) if s.node not in kept]


def input_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The single tensor that flows into module `path` (its parameters aside)."""
    members = {n for n in gm.graph.nodes if _in_module(n, path)}
    ins: dict[fx.Node, None] = {}
    for n in gm.graph.nodes:
        if n in members:
            for a in n.all_input_nodes:
                if a not in members and a.op != "get_attr" and isinstance(a.meta.get("val"), torch.Tensor):
                    ins.setdefault(a)
    if len(ins) != 1:
        raise SurgeryError(
            f"module {path}: expected one input tensor in the graph, found {len(ins)} "
            f"({', '.join(n.name for n in list(ins)[:3])}); LoRA and parallel adapters need a single-input module"
        )
    return next(iter(ins))


def projection_sites(gm: fx.GraphModule, model_type: str | None, roles: tuple[str, ...]) -> list[Site]:
    """One site per chosen projection (q, k, v, o, ffn_in, ffn_gate, ffn_out) of every layer, in graph order."""
    matches = lora_matches(model_type, linear_modules(gm), roles)
    if not matches:
        raise SurgeryError(f"no {'/'.join(roles)} projections found in the graph of this {model_type} model")
    return [_beside(gm, m.path, m.path, m.layer, m.role, m.part) for m in matches]


def parallel_sites(gm: fx.GraphModule, model_type: str | None, blocks: tuple[str, ...] = ("ffn",)) -> list[Site]:
    """One site per layer and block beside the feed-forward block (input of `ffn_in`, output of `ffn_out`)
    and, when `blocks` names it, beside attention (input of `q`, output of `o`)."""
    pairs = parallel_matches(model_type, linear_modules(gm), blocks)
    if not pairs:
        raise SurgeryError(f"no {'/'.join(blocks)} blocks found in the graph of this {model_type} model")
    return [_beside(gm, last.path, first.path, last.layer, role, None) for first, last, role in pairs]


def _beside(
    gm: fx.GraphModule, path: str, input_path: str, layer: int, role: str, part: tuple[int, int] | None
) -> Site:
    site = _site(gm, path, layer, role)
    x = input_node(gm, input_path)
    width = site.width // part[1] if part else site.width
    return Site(path, layer, role, width, site.node, x.name, input_path, int(x.meta["val"].shape[-1]), part)
