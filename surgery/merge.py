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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from surgery.adapters import AdapterSpec, Bottleneck, LoRA, LoraSpec, Parallel
from surgery.errors import SurgeryError
from surgery.insert import InsertReport, adapter_target, make_adapter
from surgery.load import Source
from surgery.sites import ADAPTER_ROOT, Site, input_node, module_path, output_node

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass(frozen=True)
class MergeReport:
    """What `merge_adapters` folded: the adapter targets, by kind (lora | linear-bottleneck)."""

    merged: dict[str, str]


def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The adapters' `call_module` nodes, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(ADAPTER_ROOT + ".")]


def lift_adapters(gm: fx.GraphModule, spec: AdapterSpec | LoraSpec, sites: list[Site]) -> None:
    """Turn each site's inlined adapter (a reloaded `.pt2`) back into one `call_module` node, in place.

    Before (a Houlsby adapter after `linear_3`, as `torch.export` inlines it):

        matmul = aten.matmul(linear_3, adapters_..._down_w); add_4 = aten.add(matmul, adapters_..._down_b)
        relu = aten.relu(add_4); matmul_1 = aten.matmul(relu, adapters_..._up_w)
        add_5 = aten.add(linear_3, matmul_1); add_6 = aten.add(add_5, adapters_..._up_b)

    After, with a fresh `Bottleneck` holding the same tensors:

        adapters_encoder_layer_0_attention_output_dense = self.adapters.encoder...dense(linear_3)

    The group of a site is every node traced in module `adapters.<site>`; its one output feeds the rest of
    the graph. An adapter beside a computation ends in `y + delta`, which tells y from x.
    """
    groups: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        path = module_path(n) if n.op == "call_function" else None
        if path and path.startswith(ADAPTER_ROOT + "."):
            groups.setdefault(path, []).append(n)
    lifted = {str(n.target) for n in adapter_nodes(gm)}
    for site in sites:
        target = adapter_target(site)
        if target in lifted:
            continue
        group = groups.get(target)
        if not group:
            raise SurgeryError(f"adapter {target} named in the manifest is not in the graph; was the .pt2 edited?")
        members = set(group)
        outs = [n for n in group if any(u not in members for u in n.users)]
        assert len(outs) == 1, f"{target}: {len(outs)} outputs"
        out = outs[0]
        external = list(dict.fromkeys(
            a for n in group for a in n.all_input_nodes if a not in members and a.op != "get_attr"
        ))
        holders = [a for n in group for a in n.all_input_nodes if a.op == "get_attr"]
        state = {str(a.target).removeprefix(target + "."): gm.get_parameter(str(a.target)).detach() for a in holders}
        module = make_adapter(spec, site, dtype=out.meta["val"].dtype)
        module.load_state_dict(state)
        if site.input is None:
            assert len(external) == 1, f"{target}: inputs {external}"
            args: tuple[fx.Node, ...] = (external[0],)
        else:
            y = out.args[0]
            x = [a for a in external if a is not y]
            assert isinstance(y, fx.Node) and y in external and len(x) == 1, f"{target}: inputs {external}"
            args = (x[0], y)
        gm.add_submodule(target, module)
        with gm.graph.inserting_after(out):
            new = gm.graph.call_module(target, args)
        new.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(new)
        for n in reversed(group):
            gm.graph.erase_node(n)
        for a in dict.fromkeys(holders):
            if not a.users:
                gm.graph.erase_node(a)
    gm.graph.lint()
    gm.recompile()


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

    Before: `linear = aten.linear(x, w, b); adapters_..._query = self.adapters....query(x, linear); ... = f(adapters_..._query)`
    After:  `linear = aten.linear(x, w', b); ... = f(linear)`, with w' = w + (alpha/r)·(A B)ᵀ: the base graph.
    Refuses, before changing anything, an adapter that is not linear in its input.
    """
    nodes = adapter_nodes(gm)
    for node in nodes:
        m = gm.get_submodule(str(node.target))
        if isinstance(m, Parallel):
            raise SurgeryError(
                f"{node.target}: a parallel adapter adds s·W_up σ(W_down x) from the feed-forward block's input, "
                "which no weight of the block can absorb; keep it as an adapter (`surgery export` bakes it) or use --stack"
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
        _projection(gm, node.args[-1])  # refuses an unknown projection now, before any weight changes
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
    assert proj.node.target is aten.linear.default, proj.node.format_node()
    proj.node.args = (*proj.node.args[:2], bias_node)


def unload_adapters(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Remove every lifted adapter (in place): the graph computes the base model again, bit for bit.

    An adapter node `a = adapters.<site>(x)` (bottleneck) or `a = adapters.<site>(x, y)` (LoRA, parallel)
    is replaced by what the base computes there: its last argument. Returns each adapter's input x by
    submodule target, which is where a new adapter can go (see route.py).
    """
    inputs = {}
    for node in adapter_nodes(gm):
        inputs[str(node.target)] = node.args[0]
        node.replace_all_uses_with(node.args[-1])
        gm.graph.erase_node(node)
    if hasattr(gm, ADAPTER_ROOT):
        gm.delete_submodule(ADAPTER_ROOT)
    gm.graph.lint()
    gm.recompile()
    return inputs


def _drop_empty_root(gm: fx.GraphModule) -> None:
    root = getattr(gm, ADAPTER_ROOT, None)
    if isinstance(root, nn.Module) and not any(True for _ in root.parameters()):
        delattr(gm, ADAPTER_ROOT)


def unmerge_lora(gm: fx.GraphModule, loras: dict[str, LoRA], sites: list[Site]) -> None:
    """Undo `merge_adapters` for LoRA (in place): W ← W − (alpha/r)·(A B)ᵀ and each LoRA node back.

    Before: `linear = aten.linear(x, w', b); ... = f(linear)`
    After:  `linear = aten.linear(x, w, b); adapters_..._query = self.adapters....query(x, linear); ... = f(adapters_..._query)`
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
        cur = _last_adapter_after(gm, y)
        with gm.graph.inserting_after(cur):
            new = gm.graph.call_module(target, (x, cur))
        new.meta["val"] = cur.meta.get("val")
        cur.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()


def _last_adapter_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Follow a site's output through the adapters already applied to it."""
    while True:
        adapters = set(adapter_nodes(gm))
        nxt = [u for u in node.users if u in adapters and u.args[-1] is node]
        if not nxt:
            return node
        node = nxt[0]


def stack_adapters(gm: fx.GraphModule, other: fx.GraphModule, sites: list[Site], prefix: str) -> list[Site]:
    """Apply `other`'s adapters after `gm`'s at each site (in place): f_φ ∘ f_θ, the seed's composition.

    Before: `linear_3 = ...; adapters_..._dense = self.adapters....dense(linear_3); dropout = f(adapters_..._dense)`
    After:  `...; adapters_1_..._dense = self.adapters.1....dense(adapters_..._dense); dropout = f(adapters_1_..._dense)`
    `sites` are `other`'s, whose adapters (lifted) move under `prefix` (e.g. `adapters.1`); returns them.
    """
    for site in sites:
        module = other.get_submodule(adapter_target(site))
        target = prefix + adapter_target(site).removeprefix(ADAPTER_ROOT)
        gm.add_submodule(target, module)
        cur = _last_adapter_after(gm, output_node(gm, site.path))
        args = (cur,) if site.input is None else (input_node(gm, site.input_path or site.path), cur)
        with gm.graph.inserting_after(cur):
            new = gm.graph.call_module(target, args)
        new.meta["val"] = cur.meta.get("val")
        cur.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
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
    for node in nodes:
        target = str(node.target)
        mods = [g.get_submodule(target) for g in (gm, *others)]
        if isinstance(mods[0], LoRA):
            first = mods[0]
            A = torch.cat([w * m.scale * m.lora_A.detach() for w, m in zip(weights, mods)], dim=1)
            B = torch.cat([m.lora_B.detach() for m in mods], dim=0)
            new = LoRA(A.shape[0], B.shape[1], A.shape[1], float(A.shape[1]), out_features=first.out_features,
                       start=first.start, dtype=A.dtype)
            new.load_state_dict({"lora_A": A, "lora_B": B})
            gm.add_submodule(target, new)
        else:
            with torch.no_grad():
                for name, p in mods[0].named_parameters():
                    p.copy_(sum(w * m.get_parameter(name) for w, m in zip(weights, mods)))
    gm.graph.lint()
    gm.recompile()


def check_same_base(manifests: list[dict[str, Any]], names: list[str]) -> None:
    """Stacking and averaging combine adapters of one base model: same source weights (sha256)."""
    first = manifests[0]["source"]
    for m, name in zip(manifests[1:], names[1:]):
        if m["source"]["sha256"] != first["sha256"]:
            raise SurgeryError(
                f"{name} adapts {m['source']['name']} and {names[0]} adapts {first['name']}: different base models "
                f"(sha256 {m['source']['sha256'][:12]} vs {first['sha256'][:12]}); combine adapters of one base only"
            )


# Whole models: what `surgery merge` does with .pt2 files (open, lift, pass, check, save).

PACK = "lora.safetensors.b64"  # a merged model's LoRA tensors (safetensors, base64), for --unmerge


@dataclass(frozen=True)
class StackSpec:
    """The manifest's `adapter` of a stacked model: the specs of its parts, applied in order at each site."""

    parts: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"method": "stack", "r": None, "activation": None, "targets": None, "parts": self.parts}


@dataclass(frozen=True)
class MergeResult:
    """A merged model: what was folded, |merged - adapted| on a test batch, |unmerge(merge(W)) - W|, node counts."""

    report: MergeReport
    output_max_abs_diff: float
    unmerge_max_abs_diff: float | None  # LoRA only: the weights restored by unmerge_lora against the originals
    nodes: int
    base_nodes: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "merged": len(self.report.merged),
            "kinds": sorted(set(self.report.merged.values())),
            "output_max_abs_diff": self.output_max_abs_diff,
            "unmerge_max_abs_diff": self.unmerge_max_abs_diff,
            "nodes": self.nodes,
        }


def open_adapted(source: str, trust: bool = False) -> tuple[Any, AdapterSpec | LoraSpec, list[Site]]:
    """An adapted `.pt2` written by this tool, its spec and sites, with its adapters lifted to modules."""
    from surgery.adapters import spec_from_json
    from surgery.pipeline import open_model

    captured = open_model(source, trust=trust)
    m = captured.manifest
    if m is None:
        raise SurgeryError(f"{source} is not an adapted model (no surgery manifest); adapt it first with `surgery insert`")
    if "merged" in m:
        raise SurgeryError(f"{source} is already merged into its base weights; to get its adapters back use --unmerge")
    if m["adapter"]["method"] == "stack":
        raise SurgeryError(f"{source} is a stack of adapters; merge, stack or average the models it was made of instead")
    spec = spec_from_json(m["adapter"])
    sites = [Site.from_json(s) for s in m["sites"]]
    lift_adapters(captured.gm, spec, sites)
    captured.source = Source(**m["source"])  # what the result adapts: the base, not this file
    return captured, spec, sites


def _outputs(captured: Any) -> list[torch.Tensor]:
    sizes = {"batch": 3, "seq": 24} if "seq" in captured.signature.axes() else None
    tensors = captured.signature.examples(sizes, seed=1, pad=True)
    with torch.no_grad():
        out = captured.signature.call(captured.gm, tensors)
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def merge_model(captured: Any, sites: list[Site]) -> tuple[MergeResult, dict[str, LoRA]]:
    """Merge `captured`'s adapters (in place) and measure it: output against the adapted model, and for LoRA
    the weights `unmerge_lora` restores against the originals. Returns the LoRA modules too (for the pack)."""
    import copy

    before = _outputs(captured)
    weights = {n: p.detach().clone() for n, p in captured.gm.named_parameters() if not n.startswith(ADAPTER_ROOT + ".")}
    modules = {str(n.target): captured.gm.get_submodule(str(n.target)) for n in adapter_nodes(captured.gm)}
    loras = {t: copy.deepcopy(m) for t, m in modules.items() if isinstance(m, LoRA)}
    report = merge_adapters(captured.gm)
    out_diff = _max_diff(before, _outputs(captured))
    restored = None
    if loras and set(report.merged.values()) == {"lora"}:
        probe = copy.deepcopy(captured.gm)
        unmerge_lora(probe, copy.deepcopy(loras), sites)
        restored = max(float((probe.get_parameter(n) - w).abs().max()) for n, w in weights.items())
    return MergeResult(report, out_diff, restored, len(captured.gm.graph.nodes), None), loras


def pack_loras(loras: dict[str, LoRA]) -> str:
    """LoRA tensors as base64 safetensors text (an extra file of the merged .pt2), named as in the graph."""
    import base64

    from safetensors.torch import save

    tensors = {f"{t}.{k}": v.detach().contiguous() for t, m in loras.items() for k, v in m.state_dict().items()}
    return base64.b64encode(save(tensors)).decode("ascii")


def read_pack(path: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors a merged .pt2 carries (see `pack_loras`)."""
    import base64
    import zipfile

    from safetensors.torch import load

    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(f"/extra/{PACK}")]
        if not names:
            raise SurgeryError(f"{path}: a merged model without its LoRA tensors ({PACK}); only merged LoRA can be unmerged")
        return load(base64.b64decode(zf.read(names[0])))


def unmerge_model(source: str, trust: bool = False) -> tuple[Any, LoraSpec, list[Site], float]:
    """A merged LoRA .pt2 back to its adapted model (in memory), with its spec and sites, and the largest
    |unmerge(merge(W)) − W| that `merge_model` measured when it merged (the same arithmetic as here)."""
    from surgery.adapters import spec_from_json
    from surgery.pipeline import open_model

    captured = open_model(source, trust=trust)
    m = captured.manifest
    if m is None or "merged" not in m:
        raise SurgeryError(f"{source} is not a merged model; --unmerge takes the output of `surgery merge`")
    spec = spec_from_json(m["adapter"])
    if not isinstance(spec, LoraSpec):
        raise SurgeryError(
            f"{source} merged a {spec.method} adapter; only LoRA is unmerged (a folded bottleneck is not invertible in general)"
        )
    sites = [Site.from_json(s) for s in m["sites"]]
    tensors = read_pack(source)
    loras = {}
    for site in sites:
        t = adapter_target(site)
        lora = make_adapter(spec, site)
        lora.load_state_dict({k: tensors[f"{t}.{k}"] for k in ("lora_A", "lora_B")})
        loras[t] = lora
    unmerge_lora(captured.gm, loras, sites)
    captured.source = Source(**m["source"])
    return captured, spec, sites, m["merged"]["unmerge_max_abs_diff"]


def adapted_report(gm: fx.GraphModule, sites: list[Site]) -> InsertReport:
    """Parameter counts of an adapted GraphModule: the adapters' and the total."""
    params = list(gm.named_parameters())
    adapters = sum(p.numel() for n, p in params if n.startswith(ADAPTER_ROOT + "."))
    return InsertReport(list(sites), adapters, sum(p.numel() for _, p in params))


def combine_models(
    sources: list[str], weights: list[float] | None, trust: bool = False
) -> tuple[Any, Any, list[Site], dict[str, Any]]:
    """Several adapted .pt2 of one base as one model: stacked (`weights` None) or averaged with `weights`.

    Returns the model (the first source's, rewritten), its spec, its sites and the manifest keys that say
    what was combined and how.
    """
    opened = [open_adapted(source, trust) for source in sources]
    check_same_base([c.manifest for c, _, _ in opened], sources)
    first, spec, sites = opened[0]
    if weights is None:
        all_sites = list(sites)
        for k, (other, _, other_sites) in enumerate(opened[1:], 1):
            all_sites += stack_adapters(first.gm, other.gm, other_sites, prefix=f"{ADAPTER_ROOT}.{k}")
        parts = [
            {"prefix": ADAPTER_ROOT if k == 0 else f"{ADAPTER_ROOT}.{k}", "source": source, "sites": len(s)}
            for k, (source, (_, _, s)) in enumerate(zip(sources, opened))
        ]
        return first, StackSpec([s.to_json() for _, s, _ in opened]), all_sites, {"stack": parts}
    methods = {s.method for _, s, _ in opened}
    if len(methods) > 1:
        raise SurgeryError(
            f"--average: the models use different methods ({', '.join(sorted(methods))}); average adapters of one method only"
        )
    average_adapters(first.gm, [c.gm for c, _, _ in opened[1:]], weights)
    if isinstance(spec, LoraSpec):
        spec = LoraSpec({role: r * len(sources) for role, r in spec.ranks.items()})
        how = "weighted sum of the deltas A·B, one LoRA of the summed rank (exact)"
    else:
        how = "weighted average of the parameters"
    return first, spec, sites, {"average": {"sources": list(sources), "weights": weights, "how": how}}
