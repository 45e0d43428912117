"""Export-time rewrite of bottleneck adapters into the form ONNX Runtime runs fastest.

A bottleneck after a projection computes, with x = W a + b the projection's output,

    y = x + W_up σ(W_down x + b_down) + b_up

The up-bias can move into the projection's bias exactly: with b' = b + b_up and x' = W a + b',
    y = x' + W_up σ(W_down x' + (b_down - W_down b_up))
and what is left is a 2-D GEMM and a MatMul: `Gemm(x', W_down, b_down') -> σ` (which ORT fuses into one FusedGemm
for relu), then `MatMul(h, W_up)` and the Add of the residual x'. For a BERT layer the adapter's `forward` changes
from

    h = relu(matmul(x, down_w) + down_b); y = x + matmul(h, up_w) + up_b          # 5 kernels over (B, S, d)

to

    x2 = x.reshape(-1, d); h = relu(addmm(down_b', x2, down_w)); y = (x2 + mm(h, up_w)).reshape(B, S, d)

Measured on MiniLM r=8, ORT 1.32 CPU, b1 s128, 150 interleaved runs, two runs: +2.6% / +3.5% over the base
model, against +5.5% / +4.9% for the plain form. The up-projection was first a Gemm whose C input is the residual
(`addmm(x2, h, up_w)`, one kernel); ORT's Gemm copies C into its output on one thread and then runs the GEMM with
beta = 1, and its per-kernel profile at 2 threads put it at 44 µs against 30 µs on one thread. The MatMul and a
threaded Add cost less: +3.3% against +4.4% over the base (median of three one-process alternations each, 300 calls,
2 threads, 2026-11-28; equal at 1 thread). The rewrite changes base weights (the projection's bias), so it is for
baked exports only, which are checked against the original, unfused model in torch.

A projection without a bias (Llama, Qwen2, Gemma, Mistral: o_proj, down_proj) has none to take the up-bias. There
the up-bias rides through the bottleneck as one more rank whose pre-activation is the constant 1:

    W_down' = [W_down | 0],  b_down' = [b_down ; 1],  W_up' = [W_up ; b_up / σ(1)]

so the extra column of σ(W_down' x + b_down') is σ(1) and the extra row of W_up' adds b_up (any σ with σ(1) != 0;
relu and identity give exactly 1). The adapter is again the GEMM, the MatMul and the Add, and no base weight
changes. On SmolLM2-135M's decode step (batch 1, one token) the plain form launches 6 kernels per adapter
(MatMul, Add, Relu, MatMul, Add, Add); this form 3 after ORT's fusions (FusedGemm, MatMul, Add) besides reshapes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgery.adapters import ACTIVATIONS, AdapterSpec, Bottleneck
from surgery.graph import adapter_nodes, lift_adapters

if TYPE_CHECKING:
    from surgery.bundle import Manifest

aten = torch.ops.aten
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
BOTTLENECK_METHODS = ("houlsby", "pfeiffer")


class FusedBottleneck(nn.Module):
    """f(x) = x + W_up σ(W_down x + b_down), the up-bias already in the projection before it; a GEMM and a MatMul."""

    def __init__(self, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, activation: str):
        super().__init__()
        self.down_w = nn.Parameter(down_w.detach().clone(), requires_grad=False)  # (d, r)
        self.down_b = nn.Parameter(down_b.detach().clone(), requires_grad=False)  # (r,)
        self.up_w = nn.Parameter(up_w.detach().clone(), requires_grad=False)  # (r, d)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d)
        h = self.act(torch.addmm(self.down_b, x2, self.down_w))  # (N, r)
        return (x2 + torch.mm(h, self.up_w)).reshape(shape)  # x + h W_up: MatMul, then Add (not Gemm with C: below)


class KernelBottleneck(FusedBottleneck):
    """A FusedBottleneck as one call of the custom op `surgery::bottleneck` (surgery/kernels.py).

    On CUDA with Triton the op is one kernel launch instead of three (addmm, σ, addmm): at batch 1 the
    adapter's cost on a GPU is launch latency, not arithmetic. Elsewhere the op runs FusedBottleneck's
    three torch ops. A program exported with it needs `import surgery.kernels` before `torch.export.load`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import surgery.kernels  # noqa: F401  registers torch.ops.surgery.bottleneck

        return torch.ops.surgery.bottleneck(x, self.down_w, self.down_b, self.up_w, self.activation)


def _bias_node(x: fx.Node) -> fx.Node | None:
    """The `get_attr` of the bias that the projection producing `x` adds (through reshapes), if any."""
    while x.op == "call_function" and x.target in RESHAPES and len(x.users) == 1:
        x = x.args[0]
    if x.op != "call_function":
        return None
    bias = None
    if x.target is aten.linear.default and len(x.args) > 2:
        bias = x.args[2]
    elif x.target is aten.addmm.default:
        bias = x.args[0]
    if isinstance(bias, fx.Node) and bias.op == "get_attr" and len(bias.users) == 1:
        return bias
    return None


def _unit_rank(module: Bottleneck) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(W_down', b_down', W_up') carrying the up-bias as one more rank of constant pre-activation 1 (see the
    module's docstring); None where σ(1) = 0."""
    down_w, down_b, up_w, up_b = module.down_w, module.down_b, module.up_w, module.up_b
    at_one = float(ACTIVATIONS[module.activation](torch.ones((), dtype=torch.float32)))
    if at_one == 0.0:
        return None
    with torch.no_grad():
        w = torch.cat([down_w, down_w.new_zeros(down_w.shape[0], 1)], 1)  # (d, r+1)
        b = torch.cat([down_b, down_b.new_ones(1)])  # (r+1,)
        u = torch.cat([up_w, (up_b.float() / at_one).to(up_w.dtype)[None]], 0)  # (r+1, d)
    return w, b, u


def fuse_bottlenecks(gm: fx.GraphModule, kernel: bool = False, fold_bias: bool = True) -> int:
    """Make each bottleneck a FusedBottleneck (in place): its up-bias folded into its projection's bias, or, for a
    projection without one, carried as a unit rank (the module's docstring).

    With `kernel`, a KernelBottleneck (one custom op) instead, where the up-bias folds into the projection only.
    `fold_bias=False` leaves every base weight as it is (the unit rank everywhere): for the streamed export, whose
    base weights come from the checkpoint's bytes. Returns how many were fused.
    """
    fused = 0
    for node in adapter_nodes(gm):
        module = gm.get_submodule(str(node.target))
        x = node.args[0]
        if type(module) is not Bottleneck:
            continue
        bias_node = _bias_node(x) if fold_bias and len(x.users) == 1 else None  # the projection's bias, if ours alone
        if bias_node is not None:
            bias = gm.get_parameter(str(bias_node.target))
            with torch.no_grad():
                bias += module.up_b
                down_b = module.down_b - module.up_b @ module.down_w
            kind = KernelBottleneck if kernel else FusedBottleneck
            gm.add_submodule(str(node.target), kind(module.down_w, down_b, module.up_w, module.activation))
        elif kernel or (unit := _unit_rank(module)) is None:
            continue  # the kernel keeps its rank; an activation with σ(1) = 0 cannot carry the bias
        else:
            gm.add_submodule(str(node.target), FusedBottleneck(*unit, module.activation))
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused


def fused_copy(
    gm: fx.GraphModule, manifest: Manifest | None = None, kernel: bool = False, fold_bias: bool = True
) -> fx.GraphModule | None:
    """A copy of `gm` with its bottlenecks fused for export, or None when there is nothing to fuse.

    `manifest` (of a reloaded .adapted.pt2, whose adapters are inlined) says where the adapters are;
    `kernel` makes them KernelBottlenecks (for torch on CUDA; ONNX export takes the plain fused form).
    """
    return rewritten_copy(gm, manifest, lambda out: fuse_bottlenecks(out, kernel, fold_bias))


def rewritten_copy(
    gm: fx.GraphModule, manifest: Manifest | None, rewrite: Callable[[fx.GraphModule], int]
) -> fx.GraphModule | None:
    """A copy of `gm` with its bottlenecks as modules (lifted by `manifest` where a reloaded .adapted.pt2 has them
    inlined), rewritten in place by `rewrite`; None when there are no bottlenecks or `rewrite` changed none."""
    lifted = any(isinstance(gm.get_submodule(str(n.target)), Bottleneck) for n in adapter_nodes(gm))
    inlined = (
        manifest is not None
        and manifest.adapter.method in BOTTLENECK_METHODS
        and manifest.merged is None
        and manifest.route is None
    )
    if not lifted and not inlined:
        return None
    out = copy.deepcopy(gm)
    if not lifted:
        assert manifest is not None and isinstance(manifest.adapter, AdapterSpec)
        lift_adapters(out, manifest.adapter, list(manifest.sites))
    return out if rewrite(out) else None
