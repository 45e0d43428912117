"""The insert pass: a bottleneck adapter after each site's output node.

The pass mutates the GraphModule in place and returns a report; like every pass here it ends with
`graph.lint()` and `recompile()`. For a BERT layer the generated `forward` changes from

    linear_3 = torch.ops.aten.linear.default(reshape_1, w, b)
    dropout_1 = torch.ops.aten.dropout.default(linear_3, 0.1, False)

to

    linear_3 = torch.ops.aten.linear.default(reshape_1, w, b)
    adapters_encoder_layer_0_attention_output_dense = getattr(self.adapters.encoder.layer, "0").attention.output.dense(linear_3)
    dropout_1 = torch.ops.aten.dropout.default(adapters_encoder_layer_0_attention_output_dense, 0.1, False)

so the adapter sits between the projection and its dropout and residual add, where Houlsby et al. put it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from surgery.adapters import METHODS, AdapterSpec, Bottleneck
from surgery.errors import SurgeryError
from surgery.sites import ADAPTER_ROOT, RESIDUAL, Site


@dataclass(frozen=True)
class InsertReport:
    """What the pass did: the sites it adapted and the parameter counts after it."""

    sites: list[Site]
    trainable: int
    total: int


def bottleneck_params(d_model: int, r: int) -> int:
    """Parameters of one bottleneck: down (r·d + r) and up (d·r + d)."""
    return 2 * d_model * r + d_model + r


def houlsby_params(layers: int, d_model: int, r: int) -> int:
    """The seed's count for Houlsby adapters: 2L(2·d·r + d + r)."""
    return 2 * layers * bottleneck_params(d_model, r)


def select_sites(sites: list[Site], spec: AdapterSpec) -> list[Site]:
    """The sites a method adapts; with explicit `targets`, every site found."""
    if spec.targets is not None:
        return sites
    roles = METHODS[spec.method]
    chosen = [s for s in sites if s.role in roles or (s.role == RESIDUAL and spec.method == "houlsby")]
    if not chosen:
        raise SurgeryError(
            f"method {spec.method} adapts {'/'.join(roles)} sites, and the graph has none "
            f"(found: {', '.join(sorted({s.role for s in sites}))}); name the modules with --targets REGEX"
        )
    return chosen


def adapter_target(site: Site) -> str:
    """Submodule path of a site's adapter; its parameters are `adapters.<site>.down_w` and so on."""
    return f"{ADAPTER_ROOT}.{site.path}"


def insert_adapters(gm: fx.GraphModule, sites: list[Site], spec: AdapterSpec) -> InsertReport:
    """Freeze the base, insert a zero-initialised bottleneck after every site (in place), report counts."""
    for p in gm.parameters():
        p.requires_grad_(False)
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        node = nodes[site.node]
        adapter = Bottleneck(site.width, spec.r, spec.activation, dtype=node.meta["val"].dtype)
        target = adapter_target(site)
        gm.add_submodule(target, adapter)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node,))
        new.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    return InsertReport(sites=list(sites), trainable=trainable, total=total)
