"""Graph helpers every pass uses: where adapters are, one node inserted after another, adapters lifted and unloaded.

Adapters live under the submodule `adapters.<site>` of the GraphModule and are applied by `call_module`
nodes (the form the insert pass leaves). A model reloaded from a `.pt2` has them inlined as aten ops;
`lift_adapters` turns them back into modules. Like every pass, the functions that change a graph do so in
place and end with `graph.lint()` and `recompile()`; `insert_after` leaves that to its caller.
"""

from __future__ import annotations

import torch
from torch import fx

from surgery.adapters import AdapterSpec, LoraSpec, make_adapter
from surgery.errors import SurgeryError
from surgery.sites import ADAPTER_ROOT, Site, module_path


def adapter_target(site: Site) -> str:
    """Submodule path of a site's adapter; its parameters are `adapters.<site>.down_w` and so on
    (`adapters.<site>.lora_A`; on a slice of a fused projection `adapters.h.0.attn.c_attn.q.lora_A`)."""
    return f"{ADAPTER_ROOT}.{site.path}" + (f".{site.role}" if site.part else "")


def set_lora(gm: fx.GraphModule, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy imported LoRA weights into the adapters `insert_adapters` made: adapter target -> (lora_A, lora_B),
    each already in this tool's layout, (d_in, r) and (r, d_out)."""
    with torch.no_grad():
        for target, (a, b) in pairs.items():
            lora = gm.get_submodule(target)
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)


def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The adapters' `call_module` nodes, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(ADAPTER_ROOT + ".")]


def insert_after(gm: fx.GraphModule, node: fx.Node, target: str, args: tuple[fx.Node, ...]) -> fx.Node:
    """Insert `target(*args)` (a submodule call) right after `node` and make every other user of `node` use it.

    Before: `y = f(x); z = g(y)`.  After: `y = f(x); a = self.target(y); z = g(a)` (`a` keeps `y`'s meta val).
    The caller registers the submodule first and ends its pass with lint() and recompile().
    """
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, args)
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def insert_before_norm(gm: fx.GraphModule, y: fx.Node, z: fx.Node, target: str) -> fx.Node:
    """Insert `target(z, y)` (an adapter that reads the norm z and adds to y) and apply the add and the norm again.

    Before: `a = add(y', x); z = layer_norm(a, ...); ... = g(z)` (y' is y or y through dropout).
    After:  `a = add(y', x); z = layer_norm(a, ...); p = self.target(z, y); a_1 = add(p, x);
    z_1 = layer_norm(a_1, ...); ... = g(z_1)`: LN(y + f(LN(y + x)) + x), AdapterHub's Pfeiffer placement in a
    post-LN block (original_ln_before and original_ln_after, the norm's weights used twice). With the adapter
    removed (p = y) z_1 is z again. The caller registers the submodule and ends its pass with lint() and recompile().
    """
    a = z.args[0]
    if not isinstance(a, fx.Node) or len(a.args) < 2 or len(z.users) == 0:
        raise SurgeryError(f"{z.format_node()}: not a norm of a residual add; this placement needs LN(y + x)")
    branch = a.args[0] if _reaches(y, a.args[0]) else a.args[1]
    with gm.graph.inserting_after(z):
        p = gm.graph.call_module(target, (z, y))
    p.meta["val"] = y.meta.get("val")
    with gm.graph.inserting_after(p):
        a1 = gm.graph.node_copy(a, lambda n: p if n is branch else n)
    with gm.graph.inserting_after(a1):
        z1 = gm.graph.node_copy(z, lambda n: a1 if n is a else n)
    z.replace_all_uses_with(z1, delete_user_cb=lambda user: user is not p)
    return p


def _reaches(src: fx.Node, dst: object) -> bool:
    """Whether `dst` is `src` or follows it through single-input steps (dropout, views)."""
    while isinstance(dst, fx.Node):
        if dst is src:
            return True
        inputs = [n for n in dst.all_input_nodes if n.op != "get_attr"]
        dst = inputs[0] if len(inputs) == 1 else None
    return False


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
    Refuses, before changing anything, a group that does not have that shape (an edited or foreign file).
    """
    groups: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        path = module_path(n) if n.op == "call_function" else None
        if path and path.startswith(ADAPTER_ROOT + "."):
            groups.setdefault(path, []).append(n)
    lifted = {str(n.target) for n in adapter_nodes(gm)}
    plan = []
    for site in sites:
        target = adapter_target(site)
        if target in lifted:
            continue
        group = groups.get(target)
        if not group:
            raise SurgeryError(f"adapter {target} named in the manifest is not in the graph; was the .pt2 edited?")
        _group_args(target, group, site)  # refuses a malformed group now, before any node changes
        plan.append((site, target, group))
    for site, target, group in plan:
        out, args = _group_args(target, group, site)  # again: an earlier lift may have replaced this one's y
        holders = [a for n in group for a in n.all_input_nodes if a.op == "get_attr"]
        state = {str(a.target).removeprefix(target + "."): gm.get_parameter(str(a.target)).detach() for a in holders}
        module = make_adapter(spec, site, dtype=out.meta["val"].dtype)
        module.load_state_dict(state)
        gm.add_submodule(target, module)
        insert_after(gm, out, target, args)
        for n in reversed(group):
            gm.graph.erase_node(n)
        for a in dict.fromkeys(holders):
            if not a.users:
                gm.graph.erase_node(a)
    gm.graph.lint()
    gm.recompile()


def _group_args(target: str, group: list[fx.Node], site: Site) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """An inlined adapter's output node and the arguments its module takes: (x,) or (x, y)."""
    members = set(group)
    outs = [n for n in group if any(u not in members for u in n.users)]
    external = list(
        dict.fromkeys(a for n in group for a in n.all_input_nodes if a not in members and a.op != "get_attr")
    )
    how = "was the .pt2 edited, or written by another tool? Re-create it with `surgery insert`"
    if len(outs) != 1:
        raise SurgeryError(
            f"adapter {target}: {len(outs)} of its nodes feed the rest of the graph, expected one; {how}"
        )
    out = outs[0]
    if site.input is None:
        if len(external) != 1:
            raise SurgeryError(f"adapter {target}: takes {len(external)} inputs, expected one (x); {how}")
        return out, (external[0],)
    y = out.args[0]
    x = [a for a in external if a is not y]
    if not (isinstance(y, fx.Node) and y in external and len(x) == 1):
        raise SurgeryError(
            f"adapter {target}: takes {len(external)} inputs, expected x and the output y + delta; {how}"
        )
    return out, (x[0], y)


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


def last_adapter_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Follow a site's output through the adapters already applied to it (several chain at one node)."""
    while True:
        adapters = set(adapter_nodes(gm))
        nxt = [u for u in node.users if u in adapters and u.args[-1] is node]
        if not nxt:
            return node
        node = nxt[0]
