"""TensorRT optimization profiles: the MIN:OPT:MAX range of every dynamic axis an engine takes.

A graph without a cache gets one profile (`ONE`), from the capture's dynamic axes; a causal LM's cache graph gets two,
prefill and decode (`cache_ranges`). `--engine-shape` overrides them, inside the captured ranges. The engine's sidecar
keeps the profiles, and a runner picks the one that takes each call's shapes (`pick_profile`). No TensorRT needed.

Optimization profiles: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery.errors import SurgeryError
from surgery.parity import CHECK_SIZES
from surgery.signature import Signature


@dataclass(frozen=True)
class AxisRange:
    """min:opt:max of one dynamic axis in the optimization profile."""

    min: int
    opt: int
    max: int


def parse_shapes(text: str | None) -> dict[str, AxisRange]:
    """`batch=1:8:64,seq=16:128:512` -> {axis: AxisRange}."""
    ranges: dict[str, AxisRange] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, _, spec = item.partition("=")
        try:
            lo, opt, hi = (int(x) for x in spec.split(":"))
        except ValueError as exc:
            raise SurgeryError(
                f"--engine-shape {text!r}: write each axis as NAME=MIN:OPT:MAX, e.g. batch=1:8:64"
            ) from exc
        if not 1 <= lo <= opt <= hi:
            raise SurgeryError(f"--engine-shape {item!r}: need 1 <= MIN <= OPT <= MAX")
        ranges[name] = AxisRange(lo, opt, hi)
    return ranges


def axis_ranges(signature: Signature, overrides: dict[str, AxisRange] | None = None) -> dict[str, AxisRange]:
    """Profile ranges per dynamic axis: the captured min/max, opt at the benchmark point (batch 1, seq 128)
    clamped to the range; `overrides` (from `--engine-shape`) replace them and must stay inside the captured range."""
    axes = signature.axes()
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(axes))
    if unknown:
        raise SurgeryError(
            f"--engine-shape names axis {unknown[0]!r}; this model's dynamic axes are {', '.join(axes) or 'none'}"
        )
    ranges = {}
    for name, axis in axes.items():
        opt = min(max(CHECK_SIZES[1].get(name, axis.min), axis.min), axis.max)
        r = overrides.get(name, AxisRange(axis.min, opt, axis.max))
        if r.min < axis.min or r.max > axis.max:
            raise SurgeryError(
                f"--engine-shape {name}={r.min}:{r.opt}:{r.max} leaves the captured range {axis.min}..{axis.max}; "
                "re-capture with a wider range or narrow --engine-shape"
            )
        ranges[name] = r
    return ranges


def profile_shapes(signature: Signature, ranges: dict[str, AxisRange]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min shape, opt shape, max shape)}: what `IOptimizationProfile.set_shape` takes."""
    shapes = {}
    for spec in signature.inputs:
        triple = []
        for pick in ("min", "opt", "max"):
            triple.append(
                tuple(
                    getattr(ranges[spec.axes[i].name], pick) if i in spec.axes else s for i, s in enumerate(spec.shape)
                )
            )
        shapes[spec.name] = tuple(triple)
    return shapes


# A causal LM's cache graph (surgery/tasks.py) gets two profiles, as KV-cache engines are built: the prompt at past
# length 0, and one new token over a cache of 1..max positions. TensorRT takes a zero-length dimension in a profile
# (an empty tensor: the prefill's past_key_values); trtexec builds one profile per repeat of --minShapes/--optShapes/
# --maxShapes, in order, and a runner picks one per call (`pick_profile`, Polygraphy's `TrtRunner.set_profile`).
PREFILL, DECODE = "prefill", "decode"
ONE = "default"  # the name of the one profile of a graph without a cache
Shapes = dict[str, tuple[tuple[int, ...], ...]]


def parse_profiles(texts: str | list[str] | None, names: tuple[str, ...]) -> dict[str | None, dict[str, AxisRange]]:
    """`--engine-shape`, given once or more, each `[PROFILE:]AXIS=MIN:OPT:MAX,...` (several may also be joined by `;`):
    {profile name or None (every profile): {axis: AxisRange}}. `names` are the model's profiles."""
    items = [texts] if isinstance(texts, str) else list(texts or [])
    parsed: dict[str | None, dict[str, AxisRange]] = {}
    for text in (t.strip() for item in items for t in item.split(";")):
        if not text:
            continue
        head, sep, rest = text.partition(":")
        profile = head.strip() if sep and "=" not in head else None
        if profile is not None and profile not in names:
            raise SurgeryError(
                f"--engine-shape {text!r}: this model's profiles are {', '.join(names)}"
                + ("; drop the prefix" if names == (ONE,) else "")
            )
        for axis, r in parse_shapes(rest if profile is not None else text).items():
            parsed.setdefault(profile, {})[axis] = r
    return parsed


def cache_ranges(signature: Signature, overrides: dict[str | None, dict[str, AxisRange]] | None = None) -> dict:
    """{PREFILL: ranges, DECODE: ranges} of a cache graph's axes (batch, seq, past and their sum, total).

    Defaults: batch over its captured range (opt 1); prefill seq 1..positions (opt 128), past 0; decode seq 1,
    past 1..positions-1 (opt 128). `--engine-shape` without a prefix sets batch in both profiles, seq in the prefill's
    and past in the decode's; `prefill:` and `decode:` set one profile's. Every range stays inside the capture's.
    """
    from surgery.tasks import PAST, TOTAL

    axes = signature.axes()
    overrides = overrides or {}
    positions = axes["seq"].max
    shared = overrides.get(None, {})
    for name in {n for ranges in overrides.values() for n in ranges}:
        if name == TOTAL:
            raise SurgeryError(f"--engine-shape {TOTAL}=...: {TOTAL} is {PAST} + seq; set those instead")
        if name not in axes:
            raise SurgeryError(f"--engine-shape names axis {name!r}; this model's axes are batch, seq, {PAST}")
    if PAST in overrides.get(PREFILL, {}):
        raise SurgeryError(
            f"--engine-shape {PREFILL}:{PAST}=...: the prefill profile has no cache ({PAST} 0); set {PAST} for {DECODE}"
        )
    if "seq" in overrides.get(DECODE, {}):
        raise SurgeryError(
            f"--engine-shape {DECODE}:seq=...: the decode profile takes one new token (seq 1); set seq for {PREFILL}"
        )
    batch = axes["batch"]
    defaults = {
        "batch": AxisRange(batch.min, min(max(1, batch.min), batch.max), batch.max),
        "seq": AxisRange(1, min(128, positions), positions),
        PAST: AxisRange(1, min(128, positions - 1), positions - 1),
    }
    profiles = {}
    for profile, fixed in ((PREFILL, {PAST: AxisRange(0, 0, 0)}), (DECODE, {"seq": AxisRange(1, 1, 1)})):
        given = {**{k: v for k, v in shared.items() if k not in fixed}, **overrides.get(profile, {})}
        ranges = {name: given.get(name, defaults[name]) for name in ("batch", "seq", PAST)} | fixed
        for name, r in ranges.items():
            axis = axes[name]
            if r.min < axis.min or r.max > axis.max:
                raise SurgeryError(
                    f"--engine-shape {profile}:{name}={r.min}:{r.opt}:{r.max} leaves the captured range "
                    f"{axis.min}..{axis.max}; re-capture with a wider range or narrow --engine-shape"
                )
        total = AxisRange(*(getattr(ranges[PAST], k) + getattr(ranges["seq"], k) for k in ("min", "opt", "max")))
        if total.max > positions:
            raise SurgeryError(
                f"--engine-shape: the {profile} profile reaches {total.max} positions ({PAST} {ranges[PAST].max} + seq "
                f"{ranges['seq'].max}); the model has {positions}"
            )
        profiles[profile] = {**ranges, TOTAL: total}
    return profiles


def plan_profiles(signature: Signature, shapes: str | list[str] | dict[str, AxisRange] | None) -> dict[str, Shapes]:
    """The engine's optimization profiles by name, in TensorRT's order: {PREFILL, DECODE} for a cache graph
    (`cache_ranges`), else {ONE} (`axis_ranges`); `shapes` is what `--engine-shape` said, or `parse_shapes` of it."""
    from surgery.tasks import cache_layout

    cache = bool(cache_layout(signature))
    # a dict: parsed already, for every profile
    parsed = (
        {None: shapes} if isinstance(shapes, dict) else parse_profiles(shapes, (PREFILL, DECODE) if cache else (ONE,))
    )
    if cache:
        return {name: profile_shapes(signature, r) for name, r in cache_ranges(signature, parsed).items()}
    return {ONE: profile_shapes(signature, axis_ranges(signature, {**parsed.get(None, {}), **parsed.get(ONE, {})}))}


def _fits(shape: tuple[int, ...], triple: dict[str, list[int]]) -> bool:
    lo, hi = triple["min"], triple["max"]
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def pick_profile(
    profiles: list[dict[str, Any]], shapes: dict[str, tuple[int, ...]], what: str = "engine", names: Any = None
) -> int:
    """The index of the first profile (sidecar form: {input: {min, opt, max}}) whose ranges hold every input's shape;
    `names` (the sidecar's profile_names) name them in the refusal."""
    for index, profile in enumerate(profiles):
        if all(_fits(tuple(shapes[n]), t) for n, t in profile.items() if n in shapes):
            return index
    fed = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    names = list(names or []) or [str(k) for k in range(len(profiles))]
    takes = "; ".join(
        f"{name}: " + ", ".join(f"{n} {t['min']}..{t['max']}" for n, t in p.items() if n in shapes)
        for name, p in zip(names, profiles)
    )
    raise SurgeryError(f"{what}: no optimization profile takes {fed}; its profiles take {takes}")


def profile_sizes(signature: Signature, profiles: list[dict[str, Any]]) -> list[dict[str, int]]:
    """One parity shape per profile (sidecar form), inside it: the check's first shape (`CHECK_SIZES`) clamped."""
    sizes = []
    for profile in profiles:
        chosen: dict[str, int] = {}
        for spec in signature.inputs:
            lo, hi = profile[spec.name]["min"], profile[spec.name]["max"]
            for i, axis in spec.axes.items():
                if not axis.sum_of:
                    chosen[axis.name] = min(max(CHECK_SIZES[0].get(axis.name, lo[i]), lo[i]), hi[i])
        sizes.append(chosen)
    return sizes
