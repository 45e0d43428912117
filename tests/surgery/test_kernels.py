"""The fused bottleneck op: its reference (CPU) implementation, torch.export of it, the Triton kernel under the
interpreter (when triton imports), and the CUDA kernel itself (gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from surgery import kernels

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [((3, 37, 384), 8), ((2, 5, 1000), 3)]  # d not a multiple of any block, r below tl.dot's minimum of 16
FORMULAS = {
    "relu": F.relu,
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5)),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3))),
    "silu": lambda z: z * torch.sigmoid(z),
    "tanh": torch.tanh,
    "identity": lambda z: z,
}


def weights(d: int, r: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(d * 100 + r)
    down_w, down_b, up_w = (
        torch.randn(d, r, generator=g) / d**0.5,
        torch.randn(r, generator=g),
        torch.randn(r, d, generator=g) / r**0.5,
    )
    return tuple(t.to(device, dtype) for t in (down_w, down_b, up_w))


def test_activations_cover_the_formulas():
    assert set(kernels.ACTIVATIONS) == set(FORMULAS)


@pytest.mark.parametrize("shape,r", SHAPES)
@pytest.mark.parametrize("activation", sorted(FORMULAS))
def test_reference_op_is_the_formula(shape, r, activation):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    down_w, down_b, up_w = weights(shape[-1], r)
    y = torch.ops.surgery.bottleneck(x, down_w, down_b, up_w, activation)
    expected = x + FORMULAS[activation](x @ down_w + down_b) @ up_w
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation"):
        torch.ops.surgery.bottleneck(torch.randn(2, 16), *weights(16, 2), "swish")


class Adapted(torch.nn.Module):
    def __init__(self, d: int, r: int):
        super().__init__()
        self.down_w, self.down_b, self.up_w = (torch.nn.Parameter(t) for t in weights(d, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.surgery.bottleneck(x * 2, self.down_w, self.down_b, self.up_w, "gelu")


def test_export_keeps_the_op_and_runs():
    model, x = Adapted(384, 8), torch.randn(2, 7, 384)
    seq = torch.export.Dim("seq", min=2, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({1: seq},), strict=False)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.surgery.bottleneck.default in targets
    other = torch.randn(2, 11, 384)
    torch.testing.assert_close(program.module()(other), model(other), atol=1e-6, rtol=0)


def test_available_says_why_not():
    reason = kernels.available()
    assert (reason is None) == (torch.cuda.is_available() and kernels.triton is not None)
    assert reason is None or isinstance(reason, str)


INTERPRETED = """
import json, sys, torch
from surgery import kernels
from tests.surgery.test_kernels import FORMULAS, SHAPES, weights
errors = {}
for shape, r in SHAPES + [((70, 1000), 64)]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    down_w, down_b, up_w = weights(shape[-1], r)
    for activation in FORMULAS:
        expected = kernels.reference(x, down_w, down_b, up_w, activation)
        # columns split over programs, unevenly, and all of d in one program; both row-block heights
        for programs, few_rows in ((264, 4096), (3, 0), (1, 4096)):
            kernels.PROGRAMS, kernels.FEW_ROWS = programs, few_rows
            y = kernels._launch(x.reshape(-1, shape[-1]), down_w, down_b, up_w, activation).reshape(shape)
            key = f"{shape} r={r} {activation} programs={programs} few_rows={few_rows}"
            errors[key] = (y - expected).abs().max().item()
json.dump(errors, sys.stdout)
"""


def test_triton_kernel_in_the_interpreter():
    pytest.importorskip("triton", reason="the triton compiler ships with CUDA builds of torch, not the CPU wheel")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-c", INTERPRETED], check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    errors = json.loads(p.stdout)
    assert len(errors) == 3 * len(FORMULAS) * 3
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: {errors[worst]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_matches_reference_and_replays_in_a_graph(dtype):
    if kernels.available() is not None:
        pytest.skip(kernels.available())
    cases = [(shape, r, a) for shape, r in SHAPES for a in FORMULAS]
    cases += [((1, 128, 1024), 8, "relu"), ((4, 4096, 4096), 64, "gelu")]  # batch 1 (columns split), many rows
    for shape, r, activation in cases:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        down_w, down_b, up_w = weights(shape[-1], r, dtype, "cuda")
        y = torch.ops.surgery.bottleneck(x, down_w, down_b, up_w, activation)
        assert y.dtype == dtype
        assert_close_to_fp32(y, x, down_w, down_b, up_w, activation)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = torch.ops.surgery.bottleneck(x, down_w, down_b, up_w, activation)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert_close_to_fp32(captured, x, down_w, down_b, up_w, activation)


def assert_close_to_fp32(y: torch.Tensor, x: torch.Tensor, *params) -> None:
    """fp32: elementwise to 1e-4; half types: within 2e-2 of the fp32 result's scale, in max and in norm."""
    expected = kernels.reference(x.float(), *(p.float() if isinstance(p, torch.Tensor) else p for p in params))
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
        return
    error = (y.float() - expected).abs()
    assert error.max() <= 2e-2 * expected.abs().max(), (error.max(), expected.abs().max())
    assert error.norm() <= 2e-2 * expected.norm(), (error.norm(), expected.norm())
