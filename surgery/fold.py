"""Fold each bottleneck's down-projection into the projection before it: one wider GEMM, exact in algebra.

A bottleneck after a projection x = a W + b computes y = x + W_up σ(x W_down + b_down) + b_up. Its
pre-activation is itself a projection of a: x W_down + b_down = a (W W_down) + (b W_down + b_down). So one GEMM
over the widened weight [W | W W_down] (bias [b + b_up | b W_down + b_down]) gives x (with the up-bias folded in,
as in surgery/fuse.py) and z, the bottleneck's pre-activation, side by side; the skinny down-GEMM is gone, and with
it one pass over the activations. For a GPT-2 block (Conv1D is `addmm(bias, a, W)`, W (in, d)):

    addmm = aten.addmm(c_proj_bias, view, c_proj_weight); view_1 = aten.view(addmm, [B, S, d])
    adapter = self.adapters.h_0_attn_c_proj(view_1)                   # matmul, add, σ, matmul, add, add

becomes, with c_proj_weight now (in, d + r) and its bias (d + r,):

    addmm = aten.addmm(c_proj_bias, view, c_proj_weight)
    slice_x = aten.slice(addmm, -1, 0, d); slice_z = aten.slice(addmm, -1, d, d + r)
    view_1 = aten.view(slice_x, [B, S, d])
    adapter = self.adapters.h_0_attn_c_proj(view_1, slice_z)           # σ(z), addmm(x, h, W_up)

The slices are views (no copy); the up-projection takes the residual as addmm's C input. Base weights change,
so, like fuse.py, this is for baked forms (a .pt2 for torch), checked against the unfolded model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgery.adapters import ACTIVATIONS, Bottleneck
from surgery.fuse import RESHAPES, rewritten_copy
from surgery.graph import adapter_nodes

if TYPE_CHECKING:
    from surgery.bundle import Manifest

aten = torch.ops.aten


class FoldedBottleneck(nn.Module):
    """f(x, z) = x + W_up σ(z): the bottleneck once its down-projection (z) comes from the projection's GEMM."""

    def __init__(self, up_w: torch.Tensor, activation: str):
        super().__init__()
        self.up_w = nn.Parameter(up_w.detach().clone(), requires_grad=False)  # (r, d)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # x (..., d), z (..., r) -> (..., d)
        d, r = x.shape[-1], z.shape[-1]
        h = self.act(z.reshape(-1, r))  # (N, r)
        return torch.addmm(x.reshape(-1, d), h, self.up_w).reshape(x.shape)  # x + h W_up


def _projection(x: fx.Node) -> fx.Node | None:
    """The biased `addmm`/`linear` that produces `x` through single-use reshapes, with weight and bias its own."""
    while x.op == "call_function" and x.target in RESHAPES and len(x.users) == 1:
        x = x.args[0]
    if x.op != "call_function" or len(x.users) != 1:
        return None
    if x.target is aten.addmm.default and len(x.args) == 3 and not x.kwargs:
        bias, weight = x.args[0], x.args[2]
    elif x.target is aten.linear.default and len(x.args) == 3:
        weight, bias = x.args[1], x.args[2]
    else:
        return None
    own = all(isinstance(t, fx.Node) and t.op == "get_attr" and len(t.users) == 1 for t in (weight, bias))
    return x if own else None


def _set(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, nn.Parameter(value, requires_grad=False))


def fold_bottlenecks(gm: fx.GraphModule) -> int:
    """Fold each bottleneck's down-projection and up-bias into its projection (in place); returns how many.

    A bottleneck whose input is not a biased projection (`addmm` or `linear`, weight and bias used by it alone)
    used by the adapter alone is left as it is.
    """
    folded = 0
    for node in adapter_nodes(gm):
        module = gm.get_submodule(str(node.target))
        x = node.args[0]
        if type(module) is not Bottleneck or len(x.users) != 1:
            continue
        proj = _projection(x)
        if proj is None:
            continue
        linear = proj.target is aten.linear.default
        w_node, b_node = (proj.args[1], proj.args[2]) if linear else (proj.args[2], proj.args[0])
        w, b = gm.get_parameter(str(w_node.target)), gm.get_parameter(str(b_node.target))
        d, r = module.down_w.shape
        with torch.no_grad():
            w_in = w.T if linear else w  # (in, d)
            wide = torch.cat([w_in, w_in @ module.down_w], dim=1)  # (in, d + r)
            bias = torch.cat([b + module.up_b, b @ module.down_w + module.down_b])  # (d + r,)
        _set(gm, str(w_node.target), (wide.T if linear else wide).contiguous())
        _set(gm, str(b_node.target), bias)
        with gm.graph.inserting_after(proj):
            x_part = gm.graph.call_function(aten.slice.Tensor, (proj, -1, 0, d))
        with gm.graph.inserting_after(x_part):
            z_part = gm.graph.call_function(aten.slice.Tensor, (proj, -1, d, d + r))
        proj.replace_all_uses_with(x_part, delete_user_cb=lambda user, new=(x_part, z_part): user not in new)
        gm.add_submodule(str(node.target), FoldedBottleneck(module.up_w, module.activation))
        node.args = (node.args[0], z_part)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded


def folded_copy(gm: fx.GraphModule, manifest: Manifest | None = None) -> fx.GraphModule | None:
    """A copy of `gm` with its bottlenecks folded, or None when there is nothing to fold (see `fuse.fused_copy`)."""
    return rewritten_copy(gm, manifest, fold_bottlenecks)
