"""The insert pass: a bottleneck adapter after each site's output node.

The pass mutates the GraphModule in place and returns a report; like every pass here it ends with
`graph.lint()` and `recompile()`. For a BERT layer the generated `forward` changes from

    linear_3 = torch.ops.aten.linear.default(reshape_1, w, b)
    dropout_1 = torch.ops.aten.dropout.default(linear_3, 0.1, False)

to

    linear_3 = torch.ops.aten.linear.default(reshape_1, w, b)
    adapters_encoder_layer_0_attention_output_dense = getattr(self.adapters.encoder.layer, "0").attention.output.dense(
        linear_3
    )
    dropout_1 = torch.ops.aten.dropout.default(adapters_encoder_layer_0_attention_output_dense, 0.1, False)

so the adapter sits between the projection and its dropout and residual add, where Houlsby et al. put it.
An adapter beside a computation (LoRA, parallel) takes its input too:

    linear = torch.ops.aten.linear.default(layer_norm, w_q, b_q)
    adapters_encoder_layer_0_attention_self_query = ...attention.self.query(layer_norm, linear)   # y + s·(x A) B
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from surgery.adapters import METHODS, AdapterSpec, LoraSpec, make_adapter
from surgery.errors import SurgeryError
from surgery.graph import adapter_target, insert_after, insert_before_norm
from surgery.sites import BEFORE_NORM, RESIDUAL, Site, find_sites, parallel_sites, projection_sites


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


def sites_for(gm: fx.GraphModule, model_type: str | None, spec: AdapterSpec | LoraSpec) -> list[Site]:
    """The sites `spec` adapts: projections for LoRA, feed-forward blocks for parallel, else `select_sites`."""
    if isinstance(spec, LoraSpec):
        return projection_sites(gm, model_type, spec.targets)
    if spec.method == "parallel":
        return parallel_sites(gm, model_type, spec.blocks)
    return select_sites(find_sites(gm, model_type, spec.targets), spec)


def insert_adapters(gm: fx.GraphModule, sites: list[Site], spec: AdapterSpec | LoraSpec) -> InsertReport:
    """Freeze the base, insert a zero-initialised adapter at every site (in place), report counts.

    After the site's output node: `adapter(y)`, or `adapter(x, y)` for a site with an `input` node.
    Several adapters at one node (LoRA on q and v of a fused c_attn) chain: y -> v(x, y) -> q(x, .).
    A site of form `before_norm` reads the norm after y and adds to y, and the add and norm run again
    (`graph.insert_before_norm`).
    """
    for p in gm.parameters():
        p.requires_grad_(False)
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        node = nodes[site.node]
        adapter = make_adapter(spec, site, dtype=node.meta["val"].dtype)
        target = adapter_target(site)
        gm.add_submodule(target, adapter)
        if site.form == BEFORE_NORM:
            assert site.input is not None
            insert_before_norm(gm, node, nodes[site.input], target)
        else:
            insert_after(gm, node, target, (node,) if site.input is None else (nodes[site.input], node))
    gm.graph.lint()
    gm.recompile()
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    return InsertReport(sites=list(sites), trainable=trainable, total=total)
