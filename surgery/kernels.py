"""A bottleneck adapter as one custom op, `torch.ops.surgery.bottleneck`, fused into a single Triton kernel on CUDA.

    y = x + act(x @ down_w + down_b) @ up_w        x (..., d), down_w (d, r), down_b (r,), up_w (r, d)

On CPU (and any device without the fused kernel) the op runs the reference: two `addmm` and the activation.
On CUDA with Triton importable it is one launch over x viewed as (N, d) rows:

    grid = (cdiv(N, BLOCK_M), column programs). Program (i, j) takes rows [i*BLOCK_M, (i+1)*BLOCK_M):
    1. h = act(x[rows] @ down_w + down_b), looping over d in BLOCK_K chunks; r is padded to BLOCK_R >= 16
       (tl.dot's minimum) with masked zeros, and act(0) = 0 for every activation, so the padding stays zero;
    2. for its span of SPAN columns, in BLOCK_N chunks: y[rows, cols] = x[rows, cols] + h @ up_w[:, cols].
    Every program recomputes h for its rows (r is tiny). When there are few row blocks (batch 1) the columns are
    split over several programs to fill the GPU; with many row blocks each program takes all of d, so x is read
    from memory once (its second read, for the residual, hits L2).
    Accumulation is fp32; h is rounded to x's dtype before the up-projection, as the reference does. fp32 inputs
    never take plain TF32 (see _dot_precision), matching torch's default fp32 matmul.

d and r are compile-time constants (a model has one width), N is not: the kernel is compiled once per
(dtype, d, r, activation, block sizes, SPAN). A call takes no host sync and allocates only y, so it can be
captured in a CUDA graph after one warm-up call (which compiles it). Eager, Triton's Python launch costs some
microseconds of host time per call; under a CUDA graph that cost is gone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from surgery.adapters import ACTIVATIONS as ADAPTER_ACTIVATIONS

try:  # optional: without triton (CI, CPU-only installs) the op runs the reference everywhere
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# the adapters' activations, and GELU's tanh approximation (the kernel's _act knows each by name)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **ADAPTER_ACTIVATIONS,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tuned on an H200 (Triton 3.6) over N = 128..16384, d = 1024..4096, r = 8 and 64, fp32 and bf16.
BLOCK_M = (16, 32)  # rows per program: for N <= FEW_ROWS (more, shorter programs), and for more rows
FEW_ROWS = 4096
BLOCK_K = 128  # chunk of d in the down-projection loop
BLOCK_N = 128  # chunk of output columns in the up-projection loop
NUM_WARPS = 4
PROGRAMS = 132  # columns are split until row blocks x column programs reach this: one per SM of an H100/H200


def reference(
    x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, activation: str
) -> torch.Tensor:
    """The adapter with plain torch ops: the op's CPU implementation and the fused kernel's fallback."""
    x2 = x.reshape(-1, x.shape[-1])
    h = _activation(activation)(torch.addmm(down_b, x2, down_w))
    return torch.addmm(x2, h, up_w).reshape(x.shape)


@torch.library.custom_op("surgery::bottleneck", mutates_args=())
def bottleneck(
    x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, activation: str
) -> torch.Tensor:
    """y = x + act(x @ down_w + down_b) @ up_w over the last dimension of x."""
    return reference(x, down_w, down_b, up_w, activation)


@bottleneck.register_fake
def _(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.empty_like(x)


@bottleneck.register_kernel("cuda")
def _(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, activation: str) -> torch.Tensor:
    if triton is None or x.dtype not in FUSED_DTYPES or {down_w.dtype, down_b.dtype, up_w.dtype} != {x.dtype}:
        return reference(x, down_w, down_b, up_w, activation)
    return _launch(x.reshape(-1, x.shape[-1]), down_w, down_b, up_w, activation).reshape(x.shape)


def available() -> str | None:
    """None when the fused CUDA kernel can run here, else why not, in one line."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if triton is None:
        return "triton is not installed"
    return None


def _launch(
    x2: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, activation: str
) -> torch.Tensor:
    """Run the fused kernel on x2 (N, d); any device Triton can launch on (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _activation(activation)  # the kernel knows the same names
    x2, down_w, down_b, up_w = (t.contiguous() for t in (x2, down_w, down_b, up_w))
    (n, d), r = x2.shape, down_w.shape[1]
    y = torch.empty_like(x2)
    if n == 0:
        return y
    block_m = BLOCK_M[n > FEW_ROWS]
    row_blocks, col_blocks = -(-n // block_m), -(-d // BLOCK_N)
    col_programs = min(col_blocks, max(1, PROGRAMS // row_blocks))
    span_blocks = -(-col_blocks // col_programs)
    grid = (row_blocks, -(-col_blocks // span_blocks))
    _bottleneck_kernel[grid](
        x2,
        down_w,
        down_b,
        up_w,
        y,
        n,
        D=d,
        R=r,
        ACT=activation,
        PRECISION=_dot_precision(x2.dtype, r),
        BLOCK_M=block_m,
        BLOCK_K=BLOCK_K,
        BLOCK_N=BLOCK_N,
        BLOCK_R=max(16, _next_pow2(r)),
        SPAN=span_blocks * BLOCK_N,
        num_warps=NUM_WARPS,
    )
    return y


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _dot_precision(dtype: torch.dtype, r: int) -> str:
    """tl.dot's input_precision. fp32 never takes plain TF32 (torch's default fp32 matmul doesn't): "ieee" for
    r <= 16, else "tf32x3" (three TF32 products, as accurate as ieee here and faster once r is large). It only
    matters for fp32 inputs; "tf32" is the default that half types ignore."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if r <= 16 else "tf32x3"


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


if triton is not None:

    @triton.jit
    def _act(z, ACT: tl.constexpr):
        if ACT == "relu":
            z = tl.maximum(z, 0.0)
        elif ACT == "gelu":
            z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif ACT == "gelu_tanh":  # 0.5 z (1 + tanh(u)) == z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
            z = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        elif ACT == "silu":
            z = z * tl.sigmoid(z)
        elif ACT == "tanh":  # tanh(z) == 2 sigmoid(2z) - 1
            z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        return z

    @triton.jit
    def _bottleneck_kernel(
        x_ptr,
        dw_ptr,
        db_ptr,
        uw_ptr,
        y_ptr,
        N,
        D: tl.constexpr,
        R: tl.constexpr,
        ACT: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        SPAN: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        row_off = rows.to(tl.int64) * D
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < R

        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            xk = tl.load(x_ptr + row_off[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wk = tl.load(dw_ptr + ks[:, None] * R + rk[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
        bias = tl.load(db_ptr + rk, mask=r_ok, other=0.0).to(tl.float32)
        h = _act(acc + bias[None, :], ACT).to(y_ptr.dtype.element_ty)

        col0 = tl.program_id(1) * SPAN
        for n0 in range(0, SPAN, BLOCK_N):
            cols = col0 + n0 + tl.arange(0, BLOCK_N)
            c_ok = cols < D
            uw = tl.load(uw_ptr + rk[:, None] * D + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            mask = row_ok[:, None] & c_ok[None, :]
            xo = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0)
            out = xo.to(tl.float32) + tl.dot(h, uw, input_precision=PRECISION)
            tl.store(y_ptr + row_off[:, None] + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)
