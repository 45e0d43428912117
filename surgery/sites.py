"""Insertion sites: where in the graph an adapter goes.

Every node of a captured graph carries `meta["nn_module_stack"]`, whose entries name the modules it was
traced in (`encoder.layer.0.attention.output.dense`). A site is a module's output node, found three ways:

1. `--targets REGEX`: every linear module whose path matches (`re.search`).
2. A preset for known architectures: the attention output projection and the feed-forward output
   projection of each layer, by module path.
3. The graph rule, for anything else: a linear projection whose output (through dropout, if any) is added
   to the residual stream. In a layer with two such projections, the first is `attn_out`, the second `ffn_out`.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import fx

from surgery.errors import SurgeryError

aten = torch.ops.aten

ATTN_OUT, FFN_OUT, TARGET, RESIDUAL = "attn_out", "ffn_out", "target", "residual"
ADAPTER_ROOT = "adapters"

LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default}
PASS_THROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default}
ADD_OPS = {aten.add.Tensor, aten.add_.Tensor, operator.add}


@dataclass(frozen=True)
class Preset:
    """Module-path patterns for one architecture family; group 1 of each is the layer index."""

    attn_out: str
    ffn_out: str


_BERT = Preset(attn_out=r"layer\.(\d+)\.attention\.output\.dense$", ffn_out=r"layer\.(\d+)\.output\.dense$")
_LLAMA = Preset(attn_out=r"layers\.(\d+)\.self_attn\.o_proj$", ffn_out=r"layers\.(\d+)\.mlp\.down_proj$")
PRESETS: dict[str, Preset] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "vit": _BERT,
    "distilbert": Preset(attn_out=r"layer\.(\d+)\.attention\.out_lin$", ffn_out=r"layer\.(\d+)\.ffn\.lin2$"),
    "gpt2": Preset(attn_out=r"h\.(\d+)\.attn\.c_proj$", ffn_out=r"h\.(\d+)\.mlp\.c_proj$"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "t5": Preset(attn_out=r"block\.(\d+)\.layer\.0\.SelfAttention\.o$", ffn_out=r"block\.(\d+)\.layer\.\d+\.DenseReluDense\.wo$"),
}


@dataclass(frozen=True)
class Site:
    """One insertion point: the output of the module at `path`, of width `width` (d_model)."""

    path: str  # module path, e.g. encoder.layer.0.attention.output.dense
    layer: int  # Transformer layer index
    role: str  # attn_out | ffn_out | target | residual
    width: int  # size of the output's last axis
    node: str  # name of the graph node whose value the adapter takes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
    outs = [n for n in inside if any(u not in members for u in n.users)]
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


def find_sites(gm: fx.GraphModule, model_type: str | None = None, targets: str | None = None) -> list[Site]:
    """All sites of the graph: by `targets` regex if given, else by preset, else by the graph rule."""
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
    preset = PRESETS.get(model_type or "")
    sites = list(_preset_sites(gm, candidates, preset)) if preset else _graph_rule_sites(gm, candidates)
    if not sites:
        how = f"the {model_type} preset" if preset else "the graph rule (a linear output added to the residual stream)"
        raise SurgeryError(f"no insertion sites found by {how}; name the modules with --targets REGEX")
    return sites


def _preset_sites(gm: fx.GraphModule, candidates: list[str], preset: Preset) -> Iterator[Site]:
    for path in candidates:
        for role, pattern in ((ATTN_OUT, preset.attn_out), (FFN_OUT, preset.ffn_out)):
            m = re.search(pattern, path)
            if m:
                yield _site(gm, path, int(m.group(1)), role)
                break


def _adds_to_residual(node: fx.Node) -> bool:
    """Does `node` (through dropout and copies) feed an add with another tensor of its shape?"""
    while len(node.users) == 1 and next(iter(node.users)).target in PASS_THROUGH:
        node = next(iter(node.users))
    shape = getattr(node.meta.get("val"), "shape", None)
    for user in node.users:
        if user.target in ADD_OPS:
            other = [a for a in user.args[:2] if a is not node]
            if other and isinstance(other[0], fx.Node) and getattr(other[0].meta.get("val"), "shape", None) == shape:
                return True
    return False


def _graph_rule_sites(gm: fx.GraphModule, candidates: list[str]) -> list[Site]:
    residual = []
    for path in candidates:
        try:
            out = output_node(gm, path)
        except SurgeryError:  # a shared or multi-output module is no residual branch
            continue
        if _adds_to_residual(out):
            residual.append(path)
    by_layer: dict[int, list[str]] = {}
    for path in residual:
        by_layer.setdefault(_layer_index(path), []).append(path)
    sites = []
    for layer, paths in by_layer.items():
        roles = [ATTN_OUT, FFN_OUT] if len(paths) == 2 else [RESIDUAL] * len(paths)
        sites += [_site(gm, p, layer, role) for p, role in zip(paths, roles)]
    return sites
