"""The one comparison of a candidate (ONNX Runtime, an engine, a reloaded or merged program) against torch.

Per output, over unpadded positions (attention mask 1) of every checked batch:

    max|candidate - reference| <= atol + rtol * max|reference|

like Polygraphy's `--atol/--rtol`, except that the relative part scales with the output's largest magnitude
rather than element by element: an fp32 export's error grows with the size of the activations it carries
(Qwen2.5-0.5B: 1.6e-3 absolute on outputs of magnitude ~110, 1.5e-5 relative), while a wrong export moves
outputs by a share of their scale. Both figures are reported per output.

A fixed rtol cannot be right for every depth and activation scale: fp32 rounding grows through deep models with
large activations, and torch disagrees with itself by as much (another thread count reorders its sums). So where the
fixed rule fails, `check` measures torch's own noise on the same inputs, `own_noise`: the reference run in float64
where the graph and memory allow (else at another thread count), its difference from the fp32 run being the floor.
The export then passes where it stays within `NOISE_K` times that floor (plus `atol`): fp32 rounding, however deep,
stays within a small multiple of it, while a wrong weight or site moves outputs by hundreds of floors. Both figures,
the candidate's difference and torch's own, are reported.

Two ways in: `compare` takes outputs already computed (reference and candidate lists plus an optional mask, and
optionally a second torch run for the floor); `check` runs a reference module and a candidate callable on test
batches built from a `Signature`, measuring the floor only when the fixed rule fails.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from surgery.memory import available
from surgery.signature import Signature

# Defaults for fp32 exports, chosen by measurement (docs/reference/parity.md): correct exports differ from torch by
# far less than 1e-4 of the output scale, and a corrupted weight matrix or adapter tensor moves outputs by more.
ATOL = 1e-4
RTOL = 1e-4
# Half-precision exports against torch at the same precision (atol, rtol), set from benchmarks/precision.py on real
# checkpoints (docs/reference/parity.md): ORT rounds other intermediates than torch does, so the two differ by about the
# dtype's precision times the depth; the defaults sit above the largest difference measured, and below what a
# corrupted weight moves.
HALF_TOLERANCES = {torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)}
# Where the fixed rule fails: the multiple of torch's own noise (its fp32 run against float64, or two thread counts)
# an export may differ by, chosen by measurement (docs/reference/parity.md): correct exports of real checkpoints sit
# within 4x the floor, one base weight matrix scaled by 1.01 lands hundreds of floors away.
NOISE_K = 10.0


def tolerances(dtype: torch.dtype, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """(atol, rtol) for a model in `dtype`: the given ones, else the defaults of its precision."""
    default = HALF_TOLERANCES.get(dtype, (ATOL, RTOL))
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


def weights_dtype(module: Any) -> torch.dtype:
    """The dtype of a module's floating-point parameters (fp32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


# Test shapes by axis name: an odd padded batch, then one row of the benchmark length.
# A KV cache's past length (tasks.py) is 5 in the first, 0 (a prefill) in the second. Raw audio's samples
# (wav2vec2, HuBERT): an odd length, then one second at 16 kHz.
CHECK_SIZES = (
    {"batch": 3, "seq": 37, "past": 5, "samples": 1234},
    {"batch": 1, "seq": 128, "past": 0, "samples": 16000},
)
OTHER_AXIS = (5, 9)  # sizes for axes of other names, in the same two checks


@dataclass(frozen=True)
class OutputDiff:
    """One output's figures, the worst over the checked batches."""

    max_abs: float  # max |candidate - reference| over unpadded positions
    ref_max: float  # max |reference| over the same positions
    rel: float  # max_abs / ref_max, the worst batch's (0 where both are 0, inf where the reference is 0 only)
    ok: bool  # max_abs <= allowed(atol, rtol) in every batch
    floor: float | None = None  # torch's own max |difference| on the same positions (`own_noise`), when measured

    def combine(self, other: OutputDiff) -> OutputDiff:
        floors = [f for f in (self.floor, other.floor) if f is not None]
        return OutputDiff(
            max(self.max_abs, other.max_abs),
            max(self.ref_max, other.ref_max),
            max(self.rel, other.rel),
            self.ok and other.ok,
            max(floors) if floors else None,
        )

    def allowed(self, atol: float, rtol: float, k: float = NOISE_K) -> float:
        """`atol + rtol * ref_max`, or `atol + k * floor` where torch's own noise was measured and is the larger."""
        fixed = atol + rtol * self.ref_max
        return fixed if self.floor is None else max(fixed, atol + k * self.floor)

    def share(self, atol: float, rtol: float, k: float = NOISE_K) -> float:
        """How much of its allowance this output uses (above 1: failed)."""
        allowed = self.allowed(atol, rtol, k)
        if allowed > 0:
            return self.max_abs / allowed
        return 0.0 if self.max_abs == 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        out = {"max_abs_diff": self.max_abs, "max_rel_diff": self.rel, "max_abs_ref": self.ref_max, "ok": self.ok}
        if self.floor is not None:
            out["torch_noise_abs"] = self.floor
        return out


@dataclass(frozen=True)
class Parity:
    """Per-output differences of a candidate against torch, the tolerances held to, and where the worst was."""

    atol: float
    rtol: float
    outputs: dict[str, OutputDiff]
    shapes: list[dict[str, int]] = field(default_factory=list)
    worst: str = ""  # the output (and batch) whose difference used most of its allowance
    noise: str = ""  # how torch's own noise was measured (`own_noise`), where the fixed rule failed
    k: float = NOISE_K

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.outputs.values())

    @property
    def max_abs_diff(self) -> float:
        return max((d.max_abs for d in self.outputs.values()), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((d.rel for d in self.outputs.values()), default=0.0)

    @property
    def share(self) -> float:
        """How much of its allowance the worst output uses (above 1: failed)."""
        return max((d.share(self.atol, self.rtol, self.k) for d in self.outputs.values()), default=0.0)

    @property
    def tolerance(self) -> float:
        """The absolute tolerance (`--atol`)."""
        return self.atol

    def combine(self, other: Parity) -> Parity:
        """Both checks' outputs together (same tolerances), the worse of the two `worst`."""
        outputs = dict(self.outputs)
        for name, d in other.outputs.items():
            outputs[name] = outputs[name].combine(d) if name in outputs else d
        worst = other.worst if other.share > self.share else self.worst
        noise = " and ".join(dict.fromkeys(n for n in (self.noise, other.noise) if n))
        return Parity(self.atol, self.rtol, outputs, self.shapes + other.shapes, worst, noise, self.k)

    def summary(self) -> str:
        """One line for a message: each output's absolute and relative figure, torch's own where measured, and its
        allowance; then the tolerances, how the noise was measured, and the worst."""
        parts = []
        for name, d in self.outputs.items():
            own = "" if d.floor is None else f", torch's own {d.floor:.3g}"
            allowed = d.allowed(self.atol, self.rtol, self.k)
            parts.append(f"{name} {d.max_abs:.3g} abs, {d.rel:.3g} rel (allowed {allowed:.3g}{own})")
        noise = f"; torch's own noise: {self.noise}, allowed atol + {self.k:g}x it" if self.noise else ""
        return f"{'; '.join(parts)}; --atol {self.atol:g} --rtol {self.rtol:g}{noise}; worst: {self.worst}"

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "tolerance": self.atol,
            "rtol": self.rtol,
            "parity_ok": self.ok,
            "worst": self.worst,
            "torch_noise": {"method": self.noise, "k": self.k} if self.noise else None,
            "checked_shapes": self.shapes,
            "per_output": {name: d.to_json() for name, d in self.outputs.items()},
        }


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x if x.dtype == torch.float64 else x.float()).numpy()
    return np.asarray(x, dtype=np.float64)


def compare(
    reference: Sequence[Any],
    candidate: Sequence[Any],
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    names: Sequence[str] | None = None,
    mask: Any = None,
    where: str = "",
    noise: Sequence[Any] | None = None,
    how: str = "",
    k: float | None = None,
) -> Parity:
    """`candidate` outputs against `reference` outputs (tensors or arrays, in the same order), per output.

    Where `mask` (B, S) is given, an output whose first two axes are (B, S) is compared at mask-1 positions only:
    what a model computes at padding is unspecified. A missing output or one of another shape fails (inf).
    `noise`: torch's outputs on the same inputs measured another way (`own_noise`, described by `how`); each
    output's difference from `reference` is its floor, and the output also passes within `atol + k * floor`
    (`k`: `NOISE_K` unless given).
    """
    k = NOISE_K if k is None else k
    names = list(names) if names is not None else [f"output_{i}" for i in range(max(len(reference), len(candidate)))]
    keep = None if mask is None else _array(mask).astype(bool)

    def kept(x: np.ndarray) -> np.ndarray:
        if keep is not None and x.ndim >= 2 and x.shape[:2] == keep.shape:
            return x[keep]  # unpadded positions only
        return x

    outputs = {}
    for i, name in enumerate(names):
        if i >= len(reference) or i >= len(candidate):
            outputs[name] = OutputDiff(float("inf"), 0.0, float("inf"), False)
            continue
        want, have = _array(reference[i]), _array(candidate[i])
        if want.shape != have.shape:
            outputs[name] = OutputDiff(float("inf"), 0.0, float("inf"), False)
            continue
        own = _array(noise[i]) if noise is not None and i < len(noise) else None
        if own is not None and own.shape != want.shape:
            own = None
        want, have = kept(want), kept(have)
        err = _max_abs(have - want)
        scale = float(np.abs(want).max()) if want.size else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        floor = None if own is None else _max_abs(kept(own) - want)
        d = OutputDiff(err, scale, rel, True, floor)
        outputs[name] = replace(d, ok=err <= d.allowed(atol, rtol, k))
    worst = max(outputs, key=lambda n: outputs[n].share(atol, rtol, k), default="")
    where = f"output {worst}" + (f", {where}" if where else "")
    return Parity(atol, rtol, outputs, worst=where, noise=how if noise is not None else "", k=k)


def _max_abs(x: np.ndarray) -> float:
    err = float(np.abs(x).max()) if x.size else 0.0
    return err if np.isfinite(err) else float("inf")


# The float64 copy of a reference is made only where it fits beside what is already held: its weights (twice the
# fp32 bytes) times this margin, within the memory the system reports available.
FLOAT64_MARGIN = 1.5


def own_noise(module: Any, signature: Signature, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    """torch's outputs of `module` on `tensors` measured another way, and how (`noise_of`)."""
    return noise_of(module, lambda m, ts: outputs_of(m, signature, ts), tensors)


def noise_of(module: Any, run: Callable[[Any, list], list], args: list, float64: bool = True) -> tuple[list, str]:
    """`run(module, args)` measured another way, and how: in float64 where the graph converts and the copy fits in
    memory (its difference from the fp32 run is fp32's own rounding), else (or with `float64` False) at another
    thread count (torch's disagreement with itself, a lower bound of it). Float tensors among `args` are converted
    with the module."""
    state = _tensors(module) if float64 else {}
    if float64 and _float64_fits(state):
        try:
            with torch.no_grad():
                return run(_Float64(module, state), [_to64(a) for a in args]), "torch fp32 against float64"
        except (RuntimeError, TypeError, ValueError, AssertionError, NotImplementedError):
            pass  # an op without float64, a dtype the graph checks: the thread count still measures something
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    with _threads(other), torch.no_grad():
        return run(module, args), f"torch at {threads} against {other} thread(s)"


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _to64(t: Any) -> Any:
    return t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _float64_fits(state: dict[str, torch.Tensor]) -> bool:
    """Whether float64 copies of `state`'s float tensors, with `FLOAT64_MARGIN`, fit in the memory available."""
    room = available()
    need = sum(t.numel() * 8 for t in state.values() if t.is_floating_point()) * FLOAT64_MARGIN
    return room is not None and need <= room


def _tensors(module: Any) -> dict[str, torch.Tensor]:
    """A module's parameters, buffers and plain tensor attributes that its graph reads (`get_attr`), by name."""
    if not isinstance(module, torch.nn.Module):
        return {}
    out = dict(module.named_parameters())  # one name per tied tensor: functional_call ties the rest
    out.update(dict(module.named_buffers()))
    if isinstance(module, fx.GraphModule):
        seen = {id(t) for t in out.values()}
        for node in module.graph.nodes:
            if node.op == "get_attr" and str(node.target) not in out:
                value = operator.attrgetter(str(node.target))(module)
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    out[str(node.target)] = value
    return out


_FLOATS_TO_64 = {torch.float32: torch.float64, torch.float16: torch.float64, torch.bfloat16: torch.float64}


class _Float64:
    """`module` computed in float64: its float tensors converted (through `torch.func.functional_call`, leaving the
    module itself as it was) and, for a graph, every float dtype its nodes name (casts, `full`, dtype checks)."""

    def __init__(self, module: Any, state: dict[str, torch.Tensor]) -> None:
        """`state`: the module's tensors by name (`_tensors`)."""
        self.state = {n: (t.detach().to(torch.float64) if t.is_floating_point() else t) for n, t in state.items()}
        if isinstance(module, fx.GraphModule):
            graph = copy.deepcopy(module.graph)
            for node in graph.nodes:
                node.args = map_aggregate(node.args, _dtype64)
                node.kwargs = map_aggregate(node.kwargs, _dtype64)
            module = fx.GraphModule(module, graph)  # shares the original's submodules; the state replaces their tensors
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, self.state, args, kwargs, strict=False)


def _dtype64(a: Any) -> Any:
    return _FLOATS_TO_64.get(a, a) if isinstance(a, torch.dtype) else a


def check_sizes(signature: Signature) -> list[dict[str, int]]:
    """Two test shapes within each axis's range, both unlike the captured example where the range allows."""
    sizes = []
    for k, preset in enumerate(CHECK_SIZES):
        chosen = {}
        for axis in signature.axes().values():
            if axis.sum_of:  # derived from the others (Signature.resolve)
                continue
            want = preset.get(axis.name, OTHER_AXIS[k])
            chosen[axis.name] = min(max(want, axis.min), axis.max)
        sizes.append(chosen)
    return sizes


def mask_of(signature: Signature, tensors: list[torch.Tensor]) -> np.ndarray | None:
    """The (B, S) attention mask among a model's input tensors, as booleans, if it takes one."""
    for name, t in zip(signature.names, tensors):
        if name == "attention_mask" and t.dim() == 2:
            return t.numpy().astype(bool)
    return None


def outputs_of(module: Any, signature: Signature, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A torch module's output leaves on `tensors`, without gradients."""
    with torch.no_grad():
        return [t for t in pytree.tree_leaves(signature.call(module, tensors)) if isinstance(t, torch.Tensor)]


Candidate = Callable[[list[torch.Tensor]], tuple[Sequence[str], Sequence[Any]]]


def check(
    candidate: Candidate,
    reference: Any,
    signature: Signature,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    sizes: list[dict[str, int]] | None = None,
) -> Parity:
    """`candidate` (input tensors -> output names and arrays) against the torch module `reference`, per output,
    on padded batches of `sizes` (default: `check_sizes`), seeds 1, 2, ...; where a batch fails the fixed rule,
    again with torch's own noise on it (`own_noise`) as the floor."""
    sizes = sizes or check_sizes(signature)
    result = None
    for k, s in enumerate(sizes):
        tensors = signature.examples(s, seed=k + 1, pad=True)
        expected = outputs_of(reference, signature, tensors)
        names, got = candidate(tensors)
        mask = mask_of(signature, tensors)
        one = compare(expected, got, atol=atol, rtol=rtol, names=names, mask=mask, where=f"shape {s}")
        if not one.ok:  # within fp32's own noise?
            noise, how = own_noise(reference, signature, tensors)
            one = compare(
                expected, got, atol=atol, rtol=rtol, names=names, mask=mask, where=f"shape {s}", noise=noise, how=how
            )
        one = replace(one, shapes=[s])
        result = one if result is None else result.combine(one)
    assert result is not None
    return result
