"""The adapter modules: what they compute, nothing about where they go (see insert.py).

Weights are plain parameters applied with `torch.matmul`, stored pre-transposed so that no transpose
appears in the graph: `down_w` is (d_model, r) and `up_w` is (r, d_model). The dynamo ONNX exporter
keeps such parameters as initializers under their own names (`adapters.<site>.down_w`), which is what
swapping and refitting need; `nn.Linear` weights would be transposed into anonymous tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

# Which sites each method adapts: Houlsby after attention and feed-forward, Pfeiffer after feed-forward only.
METHODS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attn_out", "ffn_out"),
    "pfeiffer": ("ffn_out",),
}


@dataclass(frozen=True)
class AdapterSpec:
    """What to insert: `method` (houlsby | pfeiffer), bottleneck size `r`, activation σ, optional site regex."""

    method: str = "houlsby"
    r: int = 8
    activation: str = "relu"
    targets: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SurgeryError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.activation not in ACTIVATIONS:
            raise SurgeryError(f"unknown activation {self.activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise SurgeryError(f"--r {self.r}: the bottleneck size must be an integer >= 1 (e.g. --r 8)")

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Bottleneck(nn.Module):
    """f(x) = x + W_up σ(W_down x + b_down) + b_up, with W_up = 0 at creation, so f is the identity."""

    def __init__(self, d_model: int, r: int, activation: str = "relu", dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= r < d_model:
            raise SurgeryError(f"--r {r}: the bottleneck must be narrower than the model (1 <= r < {d_model})")
        bound = 1 / math.sqrt(d_model)  # nn.Linear's default init for the down-projection
        self.down_w = nn.Parameter(torch.empty(d_model, r, dtype=dtype).uniform_(-bound, bound))  # (d, r)
        self.down_b = nn.Parameter(torch.zeros(r, dtype=dtype))
        self.up_w = nn.Parameter(torch.zeros(r, d_model, dtype=dtype))  # (r, d)
        self.up_b = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        h = self.act(torch.matmul(x, self.down_w) + self.down_b)  # (..., r)
        return x + torch.matmul(h, self.up_w) + self.up_b

    def extra_repr(self) -> str:
        d, r = self.down_w.shape
        return f"d_model={d}, r={r}, activation={self.activation}"


def stand_in_weights(module: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every adapter non-zero random weights (in place), a stand-in for training.

    Zero-initialised up-projections make an adapter the identity, which proves nothing about an
    export's arithmetic; checks and benchmarks use this instead. Down-projections keep their init.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("adapters.") and not name.endswith("down_w"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
