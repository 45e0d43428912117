"""Per-request routing: the adapters of several adapted models, stacked in one graph, chosen per batch row.

The routed model takes one more input, `adapter_id` (B,): row b runs adapter `adapter_id[b]`, and an id
outside 0..N-1 (-1 by convention) runs no adapter (the base model). The clamp is in the graph, so a server
that batches requests into one call (Triton's ONNX Runtime backend) never fails the batch on one bad id.
Ranks may differ between models: each is padded with zeros to the largest, which is exact (padded down
columns give σ(0) = 0 for every supported σ, padded up rows are 0).

The pass works on an adapted model's captured graph, where each adapter appears inlined under the
module path `adapters.<site>`. For a BERT layer the generated `forward` changes from

    matmul = torch.ops.aten.matmul.default(linear_3, down_w); add_4 = ...; relu = ...
    matmul_1 = ...; add_5 = ...; add_6 = torch.ops.aten.add.Tensor(linear_3, add_5)
    dropout_1 = torch.ops.aten.dropout.default(add_6, 0.1, False)

to

    adapters_encoder_layer_0_attention_output_dense = getattr(self.adapters.encoder.layer, "0").attention.output.dense(
        linear_3, adapter_id
    )
    dropout_1 = torch.ops.aten.dropout.default(adapters_encoder_layer_0_attention_output_dense, 0.1, False)

`route` rewrites a copy of the first model's graph (its inputs stay as they were). The routed graph loses
the pytree calling convention: it is called positionally, `gm(*inputs, adapter_id)`, and returns a tuple.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch.fx.graph import CodeGen

from surgery.adapters import ACTIVATIONS, AdapterSpec, StackSpec
from surgery.bundle import Manifest
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.graph import insert_after, lift_adapters, unload_adapters
from surgery.signature import InputSpec
from surgery.sites import ADAPTER_ROOT

ROUTE_INPUT = "adapter_id"
TENSORS = ("down_w", "down_b", "up_w", "up_b")


class RoutedBottleneck(nn.Module):
    """N bottlenecks stacked; row b of the batch uses bottleneck ids[b], or none where ids[b] is not in 0..N-1."""

    def __init__(
        self, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, up_b: torch.Tensor, activation: str
    ):
        super().__init__()
        self.down_w = nn.Parameter(down_w)  # (N, d, R)
        self.down_b = nn.Parameter(down_b)  # (N, R)
        self.up_w = nn.Parameter(up_w)  # (N, R, d)
        self.up_b = nn.Parameter(up_b)  # (N, d)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # x (B, ..., d), ids (B,)
        n = self.down_w.shape[0]
        idx = ids.clamp(min=0, max=n - 1)  # a valid index for every row; rows outside 0..N-1 are masked below
        bcast = [x.shape[0]] + [1] * (x.dim() - 2) + [-1]
        h = self.act(torch.matmul(x, self.down_w[idx]) + self.down_b[idx].view(bcast))  # (B, ..., R)
        y = torch.matmul(h, self.up_w[idx]) + self.up_b[idx].view(bcast)  # (B, ..., d)
        keep = ((ids >= 0) & (ids < n)).to(x.dtype).view([x.shape[0]] + [1] * (x.dim() - 1))
        return x + keep * y


@dataclass(frozen=True)
class RouteReport:
    sites: list[str]
    models: int
    rank: int  # the padded rank R


def _refuse_mismatch(first: Manifest, other: Manifest, name: str) -> None:
    """Routed models must share base, method, activation and sites, and hold bottlenecks; say which differs."""
    a, b = first.adapter, other.adapter
    checks = [
        ("base model", first.source.sha256[:12], other.source.sha256[:12]),
        ("method", a.method, b.method),
    ]
    for what, want, got in checks:
        if want != got:
            raise SurgeryError(
                f"--route: {name} differs from the first model in its {what} ({want} vs {got}); "
                "routed models must share it"
            )
    if not isinstance(a, AdapterSpec) or a.method not in ("houlsby", "pfeiffer"):
        raise SurgeryError(f"--route takes bottleneck adapters; {a.method} is not one")
    assert isinstance(b, AdapterSpec)  # same method as a
    if a.activation != b.activation:
        raise SurgeryError(
            f"--route: {name} differs from the first model in its activation ({a.activation} vs {b.activation}); "
            "routed models must share it"
        )
    want, got = [s.path for s in first.sites], [s.path for s in other.sites]
    if want != got:
        detail = f"{len(want)} vs {len(got)} sites, first difference at {_first_diff(want, got)}"
        raise SurgeryError(
            f"--route: {name} differs from the first model in its sites ({detail}); routed models must share it"
        )


def _first_diff(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x} vs {y}"
    return (a + b)[min(len(a), len(b))]


def strip_adapters(gm: fx.GraphModule, manifest: Manifest) -> dict[str, fx.Node]:
    """Remove an adapted model's inlined adapters (in place); returns, per site path, the adapter's input node."""
    if isinstance(manifest.adapter, StackSpec):
        raise SurgeryError("a stack of adapters cannot be stripped as one; strip the models it was made of instead")
    lift_adapters(gm, manifest.adapter, list(manifest.sites))
    return {target.removeprefix(ADAPTER_ROOT + "."): x for target, x in unload_adapters(gm).items()}


def _pad(t: torch.Tensor, kind: str, rank: int) -> torch.Tensor:
    """Zero-pad one adapter tensor to `rank`: down columns, up rows (exact, see the module docstring)."""
    if kind in ("down_w", "down_b"):
        return nn.functional.pad(t, (0, rank - t.shape[-1]))
    if kind == "up_w":
        return nn.functional.pad(t, (0, 0, 0, rank - t.shape[0]))
    return t


def _stack(states: list[dict[str, torch.Tensor]], site: str, rank: int) -> list[torch.Tensor]:
    """The four tensors of one site across models, zero-padded to `rank` and stacked: (N, ...)."""
    return [
        torch.stack([_pad(state[f"{ADAPTER_ROOT}.{site}.{kind}"].detach().float(), kind, rank) for state in states])
        for kind in TENSORS
    ]


def route(models: list[Captured]) -> tuple[Captured, RouteReport]:
    """One graph holding every model's adapters, with an `adapter_id` input (the first model's graph, rewritten)."""
    if len(models) < 2:
        raise SurgeryError("--route stacks the adapters of two or more adapted models; give several .adapted.pt2 files")
    for m in models:
        if m.manifest is None:
            raise SurgeryError(
                f"--route: {m.source.name} is not an adapted model; give .adapted.pt2 files from `surgery insert`"
            )
    first = models[0].manifest
    assert first is not None
    for m in models[1:]:
        assert m.manifest is not None
        _refuse_mismatch(first, m.manifest, m.source.name)
    sites = [s.path for s in first.sites]
    states = [m.gm.state_dict() for m in models]
    rank = max(s[f"{ADAPTER_ROOT}.{sites[0]}.down_w"].shape[1] for s in states)
    gm = copy.deepcopy(models[0].gm)
    inputs = strip_adapters(gm, first)
    gm.graph._codegen = CodeGen()  # plain positional signature, so that a placeholder can be added
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        ids = gm.graph.placeholder(ROUTE_INPUT)
    activation = first.adapter.activation
    for site in sites:
        target = f"{ADAPTER_ROOT}.{site}"
        gm.add_submodule(target, RoutedBottleneck(*_stack(states, site, rank), activation))
        node = inputs[site]
        insert_after(gm, node, target, (node, ids))
    gm.graph.lint()
    gm.recompile()
    signature = models[0].signature
    batch = next(a for spec in signature.inputs for i, a in spec.axes.items() if i == 0)
    id_spec = InputSpec(ROUTE_INPUT, (signature.inputs[0].shape[0],), "int64", {0: batch}, high=len(models))
    routed_sig = replace(signature, inputs=signature.inputs + (id_spec,), positional=True)
    manifest = replace(first, route=tuple(m.source.name for m in models), signature=routed_sig)
    routed = Captured(gm=gm, signature=routed_sig, source=models[0].source, manifest=manifest, task=models[0].task)
    return routed, RouteReport(sites=sites, models=len(models), rank=int(rank))
