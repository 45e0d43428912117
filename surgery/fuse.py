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

The up-projection is a MatMul and a threaded Add rather than a Gemm taking the residual as C: ORT's Gemm copies C
into its output on one thread before the GEMM, which costs more. The rewrite changes base weights (the projection's
bias), so it is for baked exports only, which are checked against the original, unfused model in torch.

Where the projection is its own (weight and bias read by it alone) and no wider at its input than at its output
(the attention output projection; not the feed-forward's, whose input is 4 d wide), the projection and its
bottleneck become one ConcatBottleneck of the projection's input a: the pre-activation is a projection of a,
z = a (W W_down) + (b W_down + b_down), and the output one GEMM over K = d_in + r,

    y' = [a | σ(z)] [W ; W_up] + (b + b_up)          # Gemm, σ, Concat, Gemm: the up-projection's pass is gone

so the skinny up-projection and the Add over the output disappear into the projection's own GEMM (K grows by r),
at the price of a Concat copying a. A bias-free projection takes it too (b = 0). It changes base weights as well:
baked exports only. Each form's cost is measured by `benchmarks/cpu_forms.py` (figures: docs/benchmarks.md).

Elsewhere, a projection without a bias (Llama, Qwen2, Gemma, Mistral: down_proj, and o_proj where it is not
concatenated) has none to take the up-bias. There the up-bias rides through the bottleneck as one more rank whose
pre-activation is the constant 1:

    W_down' = [W_down | 0],  b_down' = [b_down ; 1],  W_up' = [W_up ; b_up / σ(1)]

so the extra column of σ(W_down' x + b_down') is σ(1) and the extra row of W_up' adds b_up (any σ with σ(1) != 0;
relu and identity give exactly 1). The adapter is again the GEMM, the MatMul and the Add (3 kernels after ORT's
fusions instead of 6), and no base weight changes.
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


class ConcatBottleneck(nn.Module):
    """A projection y = a W + b and the bottleneck after it, as two GEMMs of the projection's input a (see the
    module's docstring): z = a (W W_down) + (b W_down + b_down), then y' = [a | σ(z)] [W ; W_up] + (b + b_up)."""

    def __init__(self, wz: torch.Tensor, bz: torch.Tensor, wcat: torch.Tensor, bcat: torch.Tensor, activation: str):
        super().__init__()
        self.wz = nn.Parameter(wz.detach().clone(), requires_grad=False)  # (d_in, r)
        self.bz = nn.Parameter(bz.detach().clone(), requires_grad=False)  # (r,)
        self.wcat = nn.Parameter(wcat.detach().clone(), requires_grad=False)  # (d_in + r, d)
        self.bcat = nn.Parameter(bcat.detach().clone(), requires_grad=False)  # (d,)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d)
        a2 = a.reshape(-1, self.wz.shape[0])
        h = self.act(torch.addmm(self.bz, a2, self.wz))  # (N, r)
        y = torch.addmm(self.bcat, torch.cat([a2, h], 1), self.wcat)  # (N, d): the projection and the bottleneck
        return y.reshape(a.shape[:-1] + (y.shape[-1],))


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


def _own_projection(x: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None, bool] | None:
    """(projection, its input, weight, bias or None, is `linear`) for the `linear`/`addmm` that produces `x`
    through single-use reshapes, its weight and bias read by it alone; None for anything else."""
    while x.op == "call_function" and x.target in RESHAPES and len(x.users) == 1:
        x = x.args[0]
    if x.op != "call_function" or len(x.users) != 1 or x.kwargs:
        return None
    if x.target is aten.linear.default and len(x.args) in (2, 3):
        a, w, b, linear = x.args[0], x.args[1], (x.args[2] if len(x.args) == 3 else None), True
    elif x.target is aten.addmm.default and len(x.args) == 3:
        b, a, w, linear = x.args[0], x.args[1], x.args[2], False
    else:
        return None
    attrs = [t for t in (w, b) if t is not None]
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" and len(t.users) == 1 for t in attrs):
        return None
    shared = [n for n in x.graph.nodes if n.op == "get_attr" and n.target in {t.target for t in attrs}]
    return (x, a, w, b, linear) if len(shared) == len(attrs) else None


def _concat(gm: fx.GraphModule, node: fx.Node, module: Bottleneck) -> bool:
    """Make the projection before `node`'s bottleneck and the bottleneck one ConcatBottleneck where the projection
    is its own and no wider at its input than at its output (in place); whether it did."""
    x = node.args[0]
    found = _own_projection(x) if len(x.users) == 1 else None
    if found is None:
        return False
    proj, a, w_node, b_node, linear = found
    w = gm.get_parameter(str(w_node.target))
    w_in = w.T if linear else w  # (d_in, d)
    if w_in.shape[0] > w_in.shape[1]:
        return False  # z from a wider input costs more than the skinny GEMM it saves (the feed-forward's)
    b = gm.get_parameter(str(b_node.target)) if b_node is not None else w.new_zeros(w_in.shape[1])
    with torch.no_grad():  # the products in fp32 (a bf16 model's W W_down would round twice), stored in the dtype
        down_w = module.down_w.float()
        wz = (w_in.float() @ down_w).to(w.dtype)
        bz = (b.float() @ down_w + module.down_b.float()).to(w.dtype)
        wcat = torch.cat([w_in, module.up_w.to(w.dtype)])
        bcat = (b.float() + module.up_b.float()).to(w.dtype)
    gm.add_submodule(str(node.target), ConcatBottleneck(wz, bz, wcat, bcat, module.activation))
    with gm.graph.inserting_before(proj):
        merged = gm.graph.call_module(str(node.target), (a,))
    proj.replace_all_uses_with(merged)
    node.replace_all_uses_with(node.args[0])  # the reshapes of `merged` (or `merged` itself) now feed its users
    for dead in (node, proj, w_node, b_node):
        if dead is not None:
            gm.graph.erase_node(dead)
    for attr in (w_node, b_node):
        if attr is not None:
            owner, _, name = str(attr.target).rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, name)
    return True


def fuse_bottlenecks(gm: fx.GraphModule, kernel: bool = False, fold_bias: bool = True, concat: bool = True) -> int:
    """Make each bottleneck a ConcatBottleneck with its projection where that applies (`concat`, and the rules in the
    module's docstring), else a FusedBottleneck (in place): its up-bias folded into its projection's bias, or, for a
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
        if concat and fold_bias and not kernel and _concat(gm, node, module):
            fused += 1
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
    gm: fx.GraphModule,
    manifest: Manifest | None = None,
    kernel: bool = False,
    fold_bias: bool = True,
    concat: bool = True,
) -> fx.GraphModule | None:
    """A copy of `gm` with its bottlenecks fused for export, or None when there is nothing to fuse.

    `manifest` (of a reloaded .adapted.pt2, whose adapters are inlined) says where the adapters are;
    `kernel` makes them KernelBottlenecks (for torch on CUDA; ONNX export takes the plain fused form);
    `concat=False` leaves every projection apart from its bottleneck (no ConcatBottleneck).
    """
    return rewritten_copy(gm, manifest, lambda out: fuse_bottlenecks(out, kernel, fold_bias, concat))


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
