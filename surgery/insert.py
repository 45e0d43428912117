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
An adapter beside a computation (LoRA, parallel) takes its input too:

    linear = torch.ops.aten.linear.default(layer_norm, w_q, b_q)
    adapters_encoder_layer_0_attention_self_query = ...attention.self.query(layer_norm, linear)   # y + s·(x A) B
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from surgery.adapters import METHODS, AdapterSpec, Bottleneck, LoRA, LoraSpec, Parallel
from surgery.errors import SurgeryError
from surgery.sites import ADAPTER_ROOT, RESIDUAL, Site, find_sites, parallel_sites, projection_sites


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


def lora_params(d_in: int, d_out: int, r: int) -> int:
    """Parameters of one LoRA: A (d_in·r) and B (r·d_out), no bias."""
    return r * (d_in + d_out)


def sites_for(gm: fx.GraphModule, model_type: str | None, spec: AdapterSpec | LoraSpec) -> list[Site]:
    """The sites `spec` adapts: projections for LoRA, feed-forward blocks for parallel, else `select_sites`."""
    if isinstance(spec, LoraSpec):
        return projection_sites(gm, model_type, spec.targets)
    if spec.method == "parallel":
        return parallel_sites(gm, model_type, spec.blocks)
    return select_sites(find_sites(gm, model_type, spec.targets), spec)


def adapter_target(site: Site) -> str:
    """Submodule path of a site's adapter; its parameters are `adapters.<site>.down_w` and so on
    (`adapters.<site>.lora_A`; on a slice of a fused projection `adapters.h.0.attn.c_attn.q.lora_A`)."""
    return f"{ADAPTER_ROOT}.{site.path}" + (f".{site.role}" if site.part else "")


def make_adapter(spec: AdapterSpec | LoraSpec, site: Site, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The adapter module `spec` puts at `site` (zero-initialised: the adapted model computes the base's)."""
    if isinstance(spec, LoraSpec):
        assert site.d_in is not None
        i, n = site.part or (0, 1)
        return LoRA(site.d_in, site.width, spec.ranks[site.role], spec.alpha_for(site.role),
                    out_features=site.width * n, start=i * site.width, dtype=dtype)
    if spec.method == "parallel":
        return Parallel(site.width, spec.r, spec.activation, spec.scale, dtype=dtype)
    return Bottleneck(site.width, spec.r, spec.activation, dtype=dtype)


def insert_adapters(gm: fx.GraphModule, sites: list[Site], spec: AdapterSpec | LoraSpec) -> InsertReport:
    """Freeze the base, insert a zero-initialised adapter at every site (in place), report counts.

    After the site's output node: `adapter(y)`, or `adapter(x, y)` for a site with an `input` node.
    Several adapters at one node (LoRA on q and v of a fused c_attn) chain: y -> v(x, y) -> q(x, .).
    """
    for p in gm.parameters():
        p.requires_grad_(False)
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        node = nodes[site.node]
        adapter = make_adapter(spec, site, dtype=node.meta["val"].dtype)
        target = adapter_target(site)
        gm.add_submodule(target, adapter)
        args = (node,) if site.input is None else (nodes[site.input], node)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, args)
        new.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    return InsertReport(sites=list(sites), trainable=trainable, total=total)
