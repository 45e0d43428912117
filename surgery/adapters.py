"""The adapter modules: what they compute, nothing about where they go (see insert.py).

Weights are plain parameters applied with `torch.matmul`, stored pre-transposed so that no transpose
appears in the graph: `down_w` is (d_model, r) and `up_w` is (r, d_model); LoRA's `lora_A` is (d_in, r)
and `lora_B` is (r, d_out). The dynamo ONNX exporter
keeps such parameters as initializers under their own names (`adapters.<site>.down_w`), which is what
swapping and refitting need; `nn.Linear` weights would be transposed into anonymous tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.sites import Site

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,  # a linear adapter: it folds into the projection before it (merge.py)
}

# Which sites each method adapts: Houlsby after attention (and a decoder's cross-attention) and feed-forward,
# Pfeiffer after feed-forward only,
# parallel beside the feed-forward block (from its input to its output; with --targets attn,ffn beside attention too).
METHODS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attn_out", "cross_out", "ffn_out"),
    "pfeiffer": ("ffn_out",),
    "parallel": ("ffn_out",),
}
LORA = "lora"


@dataclass(frozen=True)
class AdapterSpec:
    """What to insert: `method` (houlsby | pfeiffer | parallel), bottleneck size `r`, activation σ, optional
    site regex, and for `parallel` the scale `s` of the branch."""

    method: str = "houlsby"
    r: int = 8
    activation: str = "relu"
    targets: str | None = None
    scale: float = 1.0  # parallel only: y + s·W_up σ(W_down x)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            known = ", ".join([*METHODS, LORA])
            raise SurgeryError(f"unknown method {self.method!r}; choose one of: {known}")
        if self.method == "parallel" and not set(self.blocks) <= {"attn", "ffn"}:
            raise SurgeryError(
                f"--targets {self.targets}: the parallel adapter spans blocks of a preset: "
                "ffn (default), attn or attn,ffn"
            )
        if not math.isfinite(self.scale) or self.scale == 0:
            raise SurgeryError(f"--scale {self.scale}: the scale must be a finite non-zero number (e.g. --scale 4)")
        if self.activation not in ACTIVATIONS:
            raise SurgeryError(f"unknown activation {self.activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise SurgeryError(f"--r {self.r}: the bottleneck size must be an integer >= 1 (e.g. --r 8)")

    @property
    def blocks(self) -> tuple[str, ...]:
        """parallel: the blocks it spans, from `targets` (attn, ffn; default ffn)."""
        return tuple(t.strip() for t in (self.targets or "ffn").split(",") if t.strip())

    def to_json(self) -> dict[str, object]:
        """The fields; `scale` only for the parallel adapter, the one method it means something for."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "scale" or self.method == "parallel"}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA: a rank per projection (`ranks`, e.g. {"q": 8, "v": 8}) and `alpha`; the delta is scaled by alpha/r.

    Projections are named per architecture (sites.PROJECTIONS): q, k, v, o, ffn_in, ffn_gate, ffn_out.
    `alpha=None` means alpha = r for every projection, a scaling of 1.
    """

    ranks: dict[str, int]
    alpha: float | None = None
    method: str = LORA

    def __post_init__(self) -> None:
        if not self.ranks:
            raise SurgeryError("LoRA needs at least one projection; e.g. --targets q,v --r 8, or --r q=8,v=8")
        for role, r in self.ranks.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise SurgeryError(f"--r {role}={r}: a LoRA rank must be an integer >= 1 (e.g. --r {role}=8)")
        if self.alpha is not None and (not math.isfinite(self.alpha) or self.alpha <= 0):
            raise SurgeryError(f"--alpha {self.alpha}: alpha must be a positive number (e.g. --alpha 16)")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.ranks)

    def alpha_for(self, role: str) -> float:
        return float(self.ranks[role] if self.alpha is None else self.alpha)

    @classmethod
    def parse(cls, r: str, targets: str | None = None, alpha: float | None = None) -> LoraSpec:
        """From the CLI: `--r 8 --targets q,v`, or per projection `--r q=2,k=2,v=2,o=2` (then no --targets)."""
        text = str(r).strip()
        if "=" in text:
            if targets is not None:
                raise SurgeryError(f"--r {text} names its projections; drop --targets {targets}")
            ranks = {}
            for item in text.split(","):
                role, _, value = item.partition("=")
                ranks[role.strip()] = _int(value, f"--r {text}")
            return cls(ranks, alpha)
        roles = [t.strip() for t in (targets or "q,v").split(",") if t.strip()]
        return cls({role: _int(text, f"--r {text}") for role in roles}, alpha)

    def to_json(self) -> dict[str, object]:
        return {
            "method": LORA,
            "r": dict(self.ranks),
            "alpha": self.alpha,
            "targets": list(self.ranks),
            "activation": None,
        }


def _int(text: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError as exc:
        raise SurgeryError(f"{where}: {text.strip()!r} is not an integer rank; e.g. --r 8 or --r q=8,v=8") from exc


def parse_spec(
    method: str,
    r: str,
    activation: str = "relu",
    targets: str | None = None,
    alpha: float | None = None,
    scale: float = 1.0,
) -> AdapterSpec | LoraSpec:
    """The spec the CLI options describe: LoRA ranks per projection, or a bottleneck of size r."""
    if method == LORA:
        return LoraSpec.parse(r, targets, alpha)
    return AdapterSpec(method=method, r=_int(str(r), f"--r {r}"), activation=activation, targets=targets, scale=scale)


@dataclass(frozen=True)
class StackSpec:
    """A stacked model's adapters: the specs of its parts, applied in order at each site (`surgery merge --stack`).

    A stack has no single r or activation; each part has its own.
    """

    parts: tuple[AdapterSpec | LoraSpec, ...]
    method: str = "stack"

    def __post_init__(self) -> None:
        if len(self.parts) < 2 or any(isinstance(p, StackSpec) for p in self.parts):
            raise SurgeryError(
                f"a stack holds two or more adapter specs, not stacks ({len(self.parts)} given); "
                "stack the models it was made of instead"
            )

    def to_json(self) -> dict[str, object]:
        return {"method": "stack", "parts": [p.to_json() for p in self.parts]}


def spec_from_json(d: dict[str, object]) -> AdapterSpec | LoraSpec | StackSpec:
    """The spec of a manifest's `adapter` (a stack's JSON from earlier versions also carries `r: null` and so on)."""
    if d["method"] == "stack":
        return StackSpec(tuple(spec_from_json(p) for p in d["parts"]))  # type: ignore[union-attr, arg-type]
    if d["method"] == LORA:
        return LoraSpec(dict(d["r"]), d.get("alpha"))  # type: ignore[arg-type]
    keys = {f.name for f in fields(AdapterSpec)}
    return AdapterSpec(**{k: v for k, v in d.items() if k in keys})  # type: ignore[arg-type]


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


class Parallel(Bottleneck):
    """Beside a block y = F(x): y + s·(W_up σ(W_down x + b_down) + b_up), W_up = 0 at creation (He et al. 2022)."""

    def __init__(
        self, d_model: int, r: int, activation: str = "relu", scale: float = 1.0, dtype: torch.dtype = torch.float32
    ):
        super().__init__(d_model, r, activation, dtype)
        self.scale = scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x (..., d), y (..., d) -> (..., d)
        h = self.act(torch.matmul(x, self.down_w) + self.down_b)  # (..., r)
        return y + self.scale * (torch.matmul(h, self.up_w) + self.up_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


class LoRA(nn.Module):
    """Beside a projection y = W x + b: y + (alpha/r)·(x A) B, with B = 0 at creation, so the sum is y.

    `lora_A` is (d_in, r), `lora_B` is (r, d_out). On a fused projection (GPT-2's c_attn holds q, k and v)
    the delta fills output columns [start, start + d_out) of `out_features` and is zero elsewhere.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int,
        alpha: float,
        *,
        out_features: int | None = None,
        start: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not 1 <= r <= min(d_in, d_out):
            raise SurgeryError(f"--r {r}: a LoRA rank must be between 1 and min(d_in, d_out) = {min(d_in, d_out)}")
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default init, as loralib's kaiming_uniform_(a=sqrt(5))
        self.lora_A = nn.Parameter(torch.empty(d_in, r, dtype=dtype).uniform_(-bound, bound))  # (d_in, r)
        self.lora_B = nn.Parameter(torch.zeros(r, d_out, dtype=dtype))  # (r, d_out)
        self.alpha = alpha
        self.out_features = out_features or d_out
        self.start = start

    @property
    def scale(self) -> float:
        return self.alpha / self.lora_A.shape[1]

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r)·A B: what the adapter adds to the projection's (d_in, d_out) weight slice."""
        return self.scale * (self.lora_A @ self.lora_B)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x (..., d_in), y (..., out_features)
        delta = torch.matmul(torch.matmul(x, self.lora_A), self.lora_B) * self.scale  # (..., d_out)
        d_out = self.lora_B.shape[1]
        if d_out != self.out_features:
            delta = F.pad(delta, (self.start, self.out_features - self.start - d_out))
        return y + delta

    def extra_repr(self) -> str:
        (d_in, r), d_out = self.lora_A.shape, self.lora_B.shape[1]
        where = (
            f", columns [{self.start}, {self.start + d_out}) of {self.out_features}"
            if d_out != self.out_features
            else ""
        )
        return f"d_in={d_in}, d_out={d_out}, r={r}, alpha={self.alpha}{where}"


def make_adapter(spec: AdapterSpec | LoraSpec, site: Site, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The adapter module `spec` puts at `site` (zero-initialised: the adapted model computes the base's)."""
    if isinstance(spec, LoraSpec):
        assert site.d_in is not None
        i, n = site.part or (0, 1)
        return LoRA(
            site.d_in,
            site.width,
            spec.ranks[site.role],
            spec.alpha_for(site.role),
            out_features=site.width * n,
            start=i * site.width,
            dtype=dtype,
        )
    if spec.method == "parallel" or site.input is not None:  # reads x (site.input), adds to y (site.node)
        return Parallel(site.width, spec.r, spec.activation, spec.scale, dtype=dtype)
    return Bottleneck(site.width, spec.r, spec.activation, dtype=dtype)


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
