"""Insertion sites: where in the graph an adapter goes.

Every node of a captured graph carries `meta["nn_module_stack"]`, whose entries name the modules it was
traced in (`encoder.layer.0.attention.output.dense`). A site is a module's output node, found three ways:

1. `--targets REGEX`: every linear module whose path matches (`re.search`).
2. A preset for known architectures: the attention output projection and the feed-forward output
   projection of each layer, by module path.
3. The graph rule, for anything else: a linear projection whose output (through dropout, if any) is added
   to the residual stream. In a layer with two such projections, the first is `attn_out`, the second `ffn_out`.

Adapters that sit beside a computation rather than after it (LoRA beside a projection, the parallel adapter
beside the feed-forward block) also take that computation's input: `projection_sites` and `parallel_sites`
fill a site's `input` (the node) and `input_path` (the module whose input it is). Projections are named per
architecture in `PROJECTIONS` (q, k, v, o, ffn_in, ffn_gate, ffn_out); a fused projection (GPT-2's `c_attn`)
gives each of q, k, v a `part` (i, n): the i-th of n equal slices of its output.
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


# Projections LoRA can target: role -> (module-path regex, group 1 the layer index; slice of a fused output).
Projection = tuple[str, "tuple[int, int] | None"]
_BERT_PROJ: dict[str, Projection] = {
    "q": (r"layer\.(\d+)\.attention\.(?:self|attention)\.query$", None),
    "k": (r"layer\.(\d+)\.attention\.(?:self|attention)\.key$", None),
    "v": (r"layer\.(\d+)\.attention\.(?:self|attention)\.value$", None),
    "o": (_BERT.attn_out, None),
    "ffn_in": (r"layer\.(\d+)\.intermediate\.dense$", None),
    "ffn_out": (_BERT.ffn_out, None),
}
_LLAMA_PROJ: dict[str, Projection] = {
    **{p: (rf"layers\.(\d+)\.self_attn\.{p}_proj$", None) for p in "qkvo"},
    "ffn_in": (r"layers\.(\d+)\.mlp\.up_proj$", None),
    "ffn_gate": (r"layers\.(\d+)\.mlp\.gate_proj$", None),
    "ffn_out": (_LLAMA.ffn_out, None),
}
PROJECTIONS: dict[str, dict[str, Projection]] = {
    "bert": _BERT_PROJ,
    "roberta": _BERT_PROJ,
    "xlm-roberta": _BERT_PROJ,
    "vit": _BERT_PROJ,
    "distilbert": {
        **{p: (rf"layer\.(\d+)\.attention\.{p}_lin$", None) for p in "qkv"},
        "o": (PRESETS["distilbert"].attn_out, None),
        "ffn_in": (r"layer\.(\d+)\.ffn\.lin1$", None),
        "ffn_out": (PRESETS["distilbert"].ffn_out, None),
    },
    "gpt2": {
        **{p: (r"h\.(\d+)\.attn\.c_attn$", (i, 3)) for i, p in enumerate("qkv")},
        "o": (PRESETS["gpt2"].attn_out, None),
        "ffn_in": (r"h\.(\d+)\.mlp\.c_fc$", None),
        "ffn_out": (PRESETS["gpt2"].ffn_out, None),
    },
    "llama": _LLAMA_PROJ,
    "mistral": _LLAMA_PROJ,
    "qwen2": _LLAMA_PROJ,
    "t5": {
        **{p: (rf"block\.(\d+)\.layer\.0\.SelfAttention\.{p}$", None) for p in "qkvo"},
        "ffn_in": (r"block\.(\d+)\.layer\.\d+\.DenseReluDense\.wi$", None),
        "ffn_out": (PRESETS["t5"].ffn_out, None),
    },
}


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

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


def _projections(model_type: str | None, what: str) -> dict[str, Projection]:
    table = PROJECTIONS.get(model_type or "")
    if table is None:
        raise SurgeryError(
            f"{what} needs the projections of the architecture, and model type {model_type or 'unknown'} has no preset "
            f"(known: {', '.join(PROJECTIONS)}); use a Houlsby or Pfeiffer adapter with --targets REGEX instead"
        )
    return table


def projection_sites(gm: fx.GraphModule, model_type: str | None, roles: tuple[str, ...]) -> list[Site]:
    """One site per chosen projection (q, k, v, o, ffn_in, ffn_gate, ffn_out) of every layer, in graph order."""
    table = _projections(model_type, "LoRA")
    unknown = [r for r in roles if r not in table]
    if unknown:
        raise SurgeryError(
            f"--targets {','.join(roles)}: {model_type} has no projection {', '.join(unknown)}; "
            f"choose from: {', '.join(table)}"
        )
    sites = []
    for path in linear_modules(gm):
        for role in roles:
            pattern, part = table[role]
            m = re.search(pattern, path)
            if m:
                sites.append(_beside(gm, path, path, int(m.group(1)), role, part))
    if not sites:
        raise SurgeryError(f"no {'/'.join(roles)} projections found in the graph of this {model_type} model")
    return sites


# Blocks a parallel adapter can span: (projection whose input it takes, projection whose output it adds to, role).
PARALLEL_BLOCKS: dict[str, tuple[str, str, str]] = {"attn": ("q", "o", ATTN_OUT), "ffn": ("ffn_in", "ffn_out", FFN_OUT)}


def parallel_sites(gm: fx.GraphModule, model_type: str | None, blocks: tuple[str, ...] = ("ffn",)) -> list[Site]:
    """One site per layer and block beside the feed-forward block (input of `ffn_in`, output of `ffn_out`)
    and, when `blocks` names it, beside attention (input of `q`, output of `o`)."""
    table = _projections(model_type, "the parallel adapter")
    paths = linear_modules(gm)
    sites = []
    for block in blocks:
        first, last, role = PARALLEL_BLOCKS[block]
        firsts, lasts = ({int(m.group(1)): p for p in reversed(paths) if (m := re.search(table[r][0], p))} for r in (first, last))
        sites += [_beside(gm, lasts[i], firsts[i], i, role, None) for i in sorted(lasts) if i in firsts]
    if not sites:
        raise SurgeryError(f"no {'/'.join(blocks)} blocks found in the graph of this {model_type} model")
    return sorted(sites, key=lambda s: s.layer)


def _beside(gm: fx.GraphModule, path: str, input_path: str, layer: int, role: str, part: tuple[int, int] | None) -> Site:
    site = _site(gm, path, layer, role)
    x = input_node(gm, input_path)
    width = site.width // part[1] if part else site.width
    return Site(path, layer, role, width, site.node, x.name, input_path, int(x.meta["val"].shape[-1]), part)
