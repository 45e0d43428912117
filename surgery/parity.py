"""The one comparison of a candidate (ONNX Runtime, an engine, a reloaded or merged program) against torch.

Per output, over unpadded positions (attention mask 1) of every checked batch:

    max|candidate - reference| <= atol + rtol * max|reference|

like Polygraphy's `--atol/--rtol`, except that the relative part scales with the output's largest magnitude
rather than element by element: an fp32 export's error grows with the size of the activations it carries
(Qwen2.5-0.5B: 1.6e-3 absolute on outputs of magnitude ~110, 1.5e-5 relative), while a wrong export moves
outputs by a share of their scale. Both figures are reported per output.

Two ways in: `compare` takes outputs already computed (reference and candidate lists plus an optional mask);
`check` runs a reference module and a candidate callable on test batches built from a `Signature`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

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


def tolerances(dtype: torch.dtype, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """(atol, rtol) for a model in `dtype`: the given ones, else the defaults of its precision."""
    default = HALF_TOLERANCES.get(dtype, (ATOL, RTOL))
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


def weights_dtype(module: Any) -> torch.dtype:
    """The dtype of a module's floating-point parameters (fp32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


# Test shapes by axis name: an odd padded batch, then one row of the benchmark length.
# A KV cache's past length (tasks.py) is 5 in the first, 0 (a prefill) in the second.
CHECK_SIZES = ({"batch": 3, "seq": 37, "past": 5}, {"batch": 1, "seq": 128, "past": 0})
OTHER_AXIS = (5, 9)  # sizes for axes of other names, in the same two checks


@dataclass(frozen=True)
class OutputDiff:
    """One output's figures, the worst over the checked batches."""

    max_abs: float  # max |candidate - reference| over unpadded positions
    ref_max: float  # max |reference| over the same positions
    rel: float  # max_abs / ref_max, the worst batch's (0 where both are 0, inf where the reference is 0 only)
    ok: bool  # max_abs <= atol + rtol * ref_max in every batch

    def combine(self, other: OutputDiff) -> OutputDiff:
        return OutputDiff(
            max(self.max_abs, other.max_abs),
            max(self.ref_max, other.ref_max),
            max(self.rel, other.rel),
            self.ok and other.ok,
        )

    def share(self, atol: float, rtol: float) -> float:
        """How much of its allowance `atol + rtol * ref_max` this output uses (above 1: failed)."""
        allowed = atol + rtol * self.ref_max
        if allowed > 0:
            return self.max_abs / allowed
        return 0.0 if self.max_abs == 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs, "max_rel_diff": self.rel, "max_abs_ref": self.ref_max, "ok": self.ok}


@dataclass(frozen=True)
class Parity:
    """Per-output differences of a candidate against torch, the tolerances held to, and where the worst was."""

    atol: float
    rtol: float
    outputs: dict[str, OutputDiff]
    shapes: list[dict[str, int]] = field(default_factory=list)
    worst: str = ""  # the output (and batch) whose difference used most of its allowance

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
        return max((d.share(self.atol, self.rtol) for d in self.outputs.values()), default=0.0)

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
        return Parity(self.atol, self.rtol, outputs, self.shapes + other.shapes, worst)

    def summary(self) -> str:
        """One line for a message: each output's absolute and relative figure and its allowance, then the worst."""
        parts = [
            f"{name} {d.max_abs:.3g} abs, {d.rel:.3g} rel (allowed {self.atol + self.rtol * d.ref_max:.3g})"
            for name, d in self.outputs.items()
        ]
        return f"{'; '.join(parts)}; --atol {self.atol:g} --rtol {self.rtol:g}; worst: {self.worst}"

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "tolerance": self.atol,
            "rtol": self.rtol,
            "parity_ok": self.ok,
            "worst": self.worst,
            "checked_shapes": self.shapes,
            "per_output": {name: d.to_json() for name, d in self.outputs.items()},
        }


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
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
) -> Parity:
    """`candidate` outputs against `reference` outputs (tensors or arrays, in the same order), per output.

    Where `mask` (B, S) is given, an output whose first two axes are (B, S) is compared at mask-1 positions only:
    what a model computes at padding is unspecified. A missing output or one of another shape fails (inf).
    """
    names = list(names) if names is not None else [f"output_{i}" for i in range(max(len(reference), len(candidate)))]
    keep = None if mask is None else _array(mask).astype(bool)
    outputs = {}
    for i, name in enumerate(names):
        if i >= len(reference) or i >= len(candidate):
            outputs[name] = OutputDiff(float("inf"), 0.0, float("inf"), False)
            continue
        want, have = _array(reference[i]), _array(candidate[i])
        if want.shape != have.shape:
            outputs[name] = OutputDiff(float("inf"), 0.0, float("inf"), False)
            continue
        if keep is not None and want.ndim >= 2 and want.shape[:2] == keep.shape:
            want, have = want[keep], have[keep]  # unpadded positions only
        err = float(np.abs(have - want).max()) if want.size else 0.0
        scale = float(np.abs(want).max()) if want.size else 0.0
        if not np.isfinite(err):
            err = float("inf")
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        outputs[name] = OutputDiff(err, scale, rel, err <= atol + rtol * scale)
    worst = max(outputs, key=lambda n: outputs[n].share(atol, rtol), default="")
    return Parity(atol, rtol, outputs, worst=f"output {worst}" + (f", {where}" if where else ""))


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
    on padded batches of `sizes` (default: `check_sizes`), seeds 1, 2, ..."""
    sizes = sizes or check_sizes(signature)
    result = None
    for k, s in enumerate(sizes):
        tensors = signature.examples(s, seed=k + 1, pad=True)
        expected = outputs_of(reference, signature, tensors)
        names, got = candidate(tensors)
        one = compare(
            expected, got, atol=atol, rtol=rtol, names=names, mask=mask_of(signature, tensors), where=f"shape {s}"
        )
        one = Parity(atol, rtol, one.outputs, [s], one.worst)
        result = one if result is None else result.combine(one)
    assert result is not None
    return result
