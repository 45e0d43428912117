"""Merge passes: adapters folded into the base weights, undone, stacked, averaged.

Each pass is one function over a GraphModule that mutates it in place (and returns a small report or
nothing), ending with `graph.lint()` and `recompile()`. They work on adapters as `call_module` nodes, the
form the insert pass leaves; a model reloaded from a `.pt2` has its adapters inlined as aten ops, and
`lift_adapters` turns them back into modules first.

- `merge_adapters`: LoRA into the projection, `W ← W + (alpha/r)·(A B)ᵀ` (nn.Linear layout; Conv1D takes
  A B as is), and a linear bottleneck (activation `identity`) into the projection before it,
  `W ← (I + D U)ᵀ W`, `b ← b (I + D U) + b_down U + b_up`. The merged graph is the base graph, node for node.
  A nonlinear bottleneck and the parallel adapter cannot be merged and are refused.
- `unmerge_lora`: `W ← W − (alpha/r)·(A B)ᵀ` and the LoRA nodes back in place.
- `stack_adapters`: another model's adapters after this one's at each site (f_φ ∘ f_θ).
- `average_adapters`: several models' adapters of one method and shape combined with weights; LoRA exactly
  (the weighted sum of the deltas A B, as one LoRA of the summed rank), bottlenecks by averaging parameters.

The graph helpers they share are in graph.py; opening, checking and saving whole `.pt2` files is pipeline.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from surgery.adapters import Bottleneck, LoRA, Parallel
from surgery.errors import SurgeryError
from surgery.graph import adapter_nodes, adapter_target, insert_after, last_adapter_after
from surgery.sites import ADAPTER_ROOT, Site, input_node, output_node

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass(frozen=True)
class MergeReport:
    """What `merge_adapters` folded: the adapter targets, by kind (lora | linear-bottleneck)."""

    merged: dict[str, str]


@dataclass(frozen=True)
class _Projection:
    weight: nn.Parameter
    bias_node: fx.Node | None
    node: fx.Node  # the op that applies the weight
    layout: str  # "linear": weight (out, in), y = x Wᵀ + b;  "matmul": weight (in, out), y = x W + b (Conv1D)


def _projection(gm: fx.GraphModule, node: fx.Node) -> _Projection:
    """The projection whose output `node` is (through LoRA nodes already on it, and a reshape)."""
    while node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), LoRA):
        node = node.args[1]  # type: ignore[assignment]
    op, layout, w, b = node, None, None, None
    if node.target is aten.linear.default:
        layout, w = "linear", node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
    elif node.target in VIEWS and isinstance(node.args[0], fx.Node) and node.args[0].target is aten.addmm.default:
        op = node.args[0]
        layout, b, w = "matmul", op.args[0], op.args[2]
    if layout is None or not isinstance(w, fx.Node) or w.op != "get_attr":
        raise SurgeryError(
            f"cannot find the weight of the projection that computes {node.format_node()}; "
            "only nn.Linear and Conv1D projections merge; keep the adapter and export it baked instead"
        )
    return _Projection(gm.get_parameter(str(w.target)), b if isinstance(b, fx.Node) else None, op, layout)


def merge_adapters(gm: fx.GraphModule) -> MergeReport:
    """Fold every LoRA and linear bottleneck into the base weights and remove its node (in place).

    Before: `linear = aten.linear(x, w, b); adapters_..._query = self.adapters....query(x, linear);
    ... = f(adapters_..._query)`
    After:  `linear = aten.linear(x, w', b); ... = f(linear)`, with w' = w + (alpha/r)·(A B)ᵀ: the base graph.
    Refuses, before changing anything, an adapter that is not linear in its input.
    """
    nodes = adapter_nodes(gm)
    for node in nodes:
        m = gm.get_submodule(str(node.target))
        if isinstance(m, Parallel):
            raise SurgeryError(
                f"{node.target}: a parallel adapter adds s·W_up σ(W_down x) from the feed-forward block's input, "
                "which no weight of the block can absorb; keep it as an adapter (`surgery export` bakes it) "
                "or use --stack"
            )
        if isinstance(m, Bottleneck) and m.activation != "identity":
            raise SurgeryError(
                f"{node.target}: a bottleneck with activation {m.activation} is nonlinear, so W_up σ(W_down y) cannot "
                "be folded into weights; keep it as an adapter (`surgery export` bakes it into ONNX), compose with "
                "--stack, or train a linear adapter (--act identity)"
            )
        if isinstance(m, Bottleneck) and len(node.args[0].users) != 1:
            raise SurgeryError(
                f"{node.target}: the projection's output is also used elsewhere, so the bottleneck cannot fold into it"
            )
        if not isinstance(m, (LoRA, Bottleneck)):
            raise SurgeryError(f"{node.target}: {type(m).__name__} adapters do not merge")
        proj = _projection(gm, node.args[-1])  # refuses an unknown projection now, before any weight changes
        if isinstance(m, Bottleneck) and proj.bias_node is None and proj.node.target is not aten.linear.default:
            raise SurgeryError(
                f"{node.target}: the projection {proj.node.format_node()} has no bias tensor to take the bottleneck's "
                "bias, and only a linear op can be given one; keep the adapter (`surgery export` bakes it)"
            )
    merged = {}
    for node in nodes:
        target = str(node.target)
        m = gm.get_submodule(target)
        y = node.args[-1]
        with torch.no_grad():
            if isinstance(m, LoRA):
                _add_lora(_projection(gm, y), m, sign=1.0)
                merged[target] = "lora"
            else:
                _fold_bottleneck(gm, _projection(gm, y), m)
                merged[target] = "linear-bottleneck"
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        gm.delete_submodule(target)
    _drop_empty_root(gm)
    gm.graph.lint()
    gm.recompile()
    return MergeReport(merged)


def _add_lora(proj: _Projection, lora: LoRA, sign: float) -> None:
    delta = sign * lora.delta_weight().to(proj.weight.dtype)  # (d_in, d_out)
    cols = slice(lora.start, lora.start + delta.shape[1])
    if proj.layout == "linear":
        proj.weight[cols, :] += delta.T
    else:
        proj.weight[:, cols] += delta


def _fold_bottleneck(gm: fx.GraphModule, proj: _Projection, b: Bottleneck) -> None:
    """y' = y + (y D + b_d) U + b_u = y M + c, with M = I + D U and c = b_d U + b_u."""
    d = b.down_w.shape[0]
    M = torch.eye(d, dtype=b.down_w.dtype) + b.down_w @ b.up_w  # (d, d)
    c = b.down_b @ b.up_w + b.up_b  # (d,)
    W = proj.weight
    W.copy_(M.T @ W if proj.layout == "linear" else W @ M)
    if proj.bias_node is not None:
        bias = gm.get_parameter(str(proj.bias_node.target))
        bias.copy_(bias @ M + c)
        return
    # A projection without a bias (Llama, T5) gets one: c, applied by the same linear op.
    owner = next(str(a.target) for a in proj.node.all_input_nodes if a.op == "get_attr").rsplit(".", 1)[0]
    gm.get_submodule(owner).register_parameter("bias", nn.Parameter(c.clone(), requires_grad=False))
    with gm.graph.inserting_before(proj.node):
        bias_node = gm.graph.get_attr(f"{owner}.bias")
    proj.node.args = (*proj.node.args[:2], bias_node)


def _drop_empty_root(gm: fx.GraphModule) -> None:
    root = getattr(gm, ADAPTER_ROOT, None)
    if isinstance(root, nn.Module) and not any(True for _ in root.parameters()):
        delattr(gm, ADAPTER_ROOT)


def unmerge_lora(gm: fx.GraphModule, loras: dict[str, LoRA], sites: list[Site]) -> None:
    """Undo `merge_adapters` for LoRA (in place): W ← W − (alpha/r)·(A B)ᵀ and each LoRA node back.

    Before: `linear = aten.linear(x, w', b); ... = f(linear)`
    After:  `linear = aten.linear(x, w, b); adapters_..._query = self.adapters....query(x, linear);
    ... = f(adapters_..._query)`
    `loras` maps each site's adapter target to its module. Sites are found again by module path, so this
    works on a merged model reloaded from a .pt2 too.
    """
    for site in sites:
        target = adapter_target(site)
        lora = loras[target]
        y, x = output_node(gm, site.path), input_node(gm, site.input_path or site.path)
        with torch.no_grad():
            _add_lora(_projection(gm, y), lora, sign=-1.0)
        gm.add_submodule(target, lora)
        cur = last_adapter_after(gm, y)
        insert_after(gm, cur, target, (x, cur))
    gm.graph.lint()
    gm.recompile()


def stack_adapters(gm: fx.GraphModule, other: fx.GraphModule, sites: list[Site], prefix: str) -> list[Site]:
    """Apply `other`'s adapters after `gm`'s at each site (in place): f_φ ∘ f_θ, the seed's composition.

    Before: `linear_3 = ...; adapters_..._dense = self.adapters....dense(linear_3); dropout = f(adapters_..._dense)`
    After:  `...; adapters_1_..._dense = self.adapters.1....dense(adapters_..._dense);
    dropout = f(adapters_1_..._dense)`
    `sites` are `other`'s, whose adapters (lifted) move under `prefix` (e.g. `adapters.1`); returns them.
    """
    for site in sites:
        if site.form is not None:
            raise SurgeryError(
                f"site {site.path}: an imported adapter placed {site.form.replace('_', ' ')} cannot be stacked; "
                "stack adapters that follow their sublayer's output (surgery insert, or an AdapterHub Houlsby)"
            )
        module = other.get_submodule(adapter_target(site))
        target = prefix + adapter_target(site).removeprefix(ADAPTER_ROOT)
        gm.add_submodule(target, module)
        cur = last_adapter_after(gm, output_node(gm, site.path))
        args = (cur,) if site.input is None else (input_node(gm, site.input_path or site.path), cur)
        insert_after(gm, cur, target, args)
    gm.graph.lint()
    gm.recompile()
    return sites


def average_adapters(gm: fx.GraphModule, others: list[fx.GraphModule], weights: list[float]) -> None:
    """Replace `gm`'s adapters with the weighted combination of its own and `others`' (in place).

    LoRA: one LoRA of rank Σ r_i with A = [w_i s_i A_i] (side by side), B = [B_i] (stacked) and scaling 1,
    so that A B = Σ w_i s_i A_i B_i, the weighted sum of the deltas, exactly. Bottlenecks: each parameter
    is Σ w_i p_i, an average of parameters (not of functions). The graph is unchanged: same nodes, same targets.
    """
    if len(weights) != 1 + len(others):
        raise SurgeryError(f"--average: {len(weights)} weights for {1 + len(others)} models; give one weight per model")
    nodes = adapter_nodes(gm)
    targets = {str(n.target) for n in nodes}
    for i, other in enumerate(others, 1):
        theirs = {str(n.target) for n in adapter_nodes(other)}
        if theirs != targets:
            raise SurgeryError(
                f"--average: model {i + 1} adapts other sites than model 1 ({len(theirs)} vs {len(targets)}); "
                "average adapters of the same sites only"
            )
        for t in targets:
            a, b = gm.get_submodule(t), other.get_submodule(t)
            shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in (a, b)]
            same_act = getattr(a, "activation", None) == getattr(b, "activation", None)
            if type(a) is not type(b) or shapes[0] != shapes[1] or not same_act:
                raise SurgeryError(
                    f"--average: {t} is {type(a).__name__} {shapes[0]} in model 1 and {type(b).__name__} {shapes[1]} "
                    f"in model {i + 1}; average adapters of the same method and shapes only"
                )
            if isinstance(a, Parallel) and a.scale != b.scale:
                raise SurgeryError(
                    f"--average: {t} has scale {a.scale:g} in model 1 and {b.scale:g} in model {i + 1}; averaging "
                    "their parameters would keep the first scale; average parallel adapters of one --scale only"
                )
    for node in nodes:
        target = str(node.target)
        mods = [g.get_submodule(target) for g in (gm, *others)]
        if isinstance(mods[0], LoRA):
            first = mods[0]
            A = torch.cat([w * m.scale * m.lora_A.detach() for w, m in zip(weights, mods)], dim=1)
            B = torch.cat([m.lora_B.detach() for m in mods], dim=0)
            new = LoRA(
                A.shape[0],
                B.shape[1],
                A.shape[1],
                float(A.shape[1]),
                out_features=first.out_features,
                start=first.start,
                dtype=A.dtype,
            )
            new.load_state_dict({"lora_A": A, "lora_B": B})
            gm.add_submodule(target, new)
        else:
            with torch.no_grad():
                for name, p in mods[0].named_parameters():
                    p.copy_(sum(w * m.get_parameter(name) for w, m in zip(weights, mods)))
    gm.graph.lint()
    gm.recompile()
