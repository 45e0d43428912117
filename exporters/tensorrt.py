"""TensorRT engines from the verified ONNX: baked (fp32/fp16/bf16) and refittable (adapter packs swapped in place).

Three stages, and only the last needs TensorRT and a GPU:

1. `prepare_trt`: the TensorRT-ready ONNX (verified in ONNX Runtime like every export), the optimization
   profile from the capture's dynamic axes (or `--engine-shape`), and the equivalent `trtexec` command line.
2. `build_engine`: ONNX parser -> network -> serialized engine, through Polygraphy's loaders
   (`NetworkFromOnnxPath`, `CreateConfig`, `EngineBytesFromNetwork`), written atomically with a JSON sidecar.
3. `refit_engine` / `run_engine`: `trt.Refitter` with a pack's tensors; `TrtRunner` to run.

Refittable engines: the adapter tensors stay named, unfolded initializers (`adapters.<site>.down_w` ...)
consumed directly by `MatMul`/`Add`, so TensorRT's ONNX parser names the engine's weights after them
(it calls `INetworkDefinition.set_weights_name` with the ONNX names). A refit keeps tensor sizes, so the
rank is fixed at `max_r` and a smaller pack is zero-padded, which is exact: padded down-projection columns
and biases are zero, and the padded up-projection rows that would read them are zero too.

Every function that needs TensorRT imports it where it is used and fails with the install command.
Documentation followed (TensorRT 10.x):
- ONNX parser / building: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
- Optimization profiles: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html
- Refitting: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/refitting-engines.html
- Refitter API: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Refitter.html
- trtexec: https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/command-line-programs.html
- Polygraphy loaders: https://github.com/NVIDIA/TensorRT/tree/main/tools/Polygraphy (polygraphy.backend.trt)
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from exporters.onnx import OPSET, check_model, export_onnx, onnx_program, refuse_mismatch
from exporters.onnx_files import atomic_onnx, save_onnx
from exporters.slots import SwappableMeta
from exporters.swappable import _with_adapters
from exporters.verify import check_onnx
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.io import atomic_output
from surgery.load import sha256_of
from surgery.packs import BOTTLENECK_SHAPES, Pack, check_pack, load_pack, pack_from_model
from surgery.parity import ATOL, CHECK_SIZES, RTOL, Parity, check
from surgery.signature import Signature
from surgery.sites import ADAPTER_ROOT

INSTALL = "pip install 'surgery[trt]'"
PRECISIONS = ("fp32", "fp16", "bf16")
SIDECAR_SUFFIX = ".json"  # engine m.plan -> m.plan.json


class TensorRTMissing(SurgeryError):
    """TensorRT (or a CUDA GPU) is not available; `prepared` holds what was written without it."""

    def __init__(self, message: str, prepared: TrtPlan | None = None):
        super().__init__(message)
        self.prepared = prepared


def require_tensorrt() -> Any:
    """`import tensorrt`, or a SurgeryError that says how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTMissing(f"TensorRT is not installed; on a machine with an NVIDIA GPU run: {INSTALL}") from exc
    return trt


# --- optimization profiles -------------------------------------------------------------------------------


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


# --- the TensorRT-ready ONNX and the trtexec command --------------------------------------------------


@dataclass
class TrtPlan:
    """Everything an engine build needs, and what was written before TensorRT was needed."""

    onnx: Path
    engine: Path
    precision: str
    profiles: dict[str, Shapes]  # {profile name: {input: (min, opt, max)}}, in TensorRT's profile order
    timing_cache: Path
    max_r: int | None = None  # refittable engine at this adapter rank
    parity: Parity | None = None
    command_file: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # fingerprint, sites, adapter: for the sidecar

    @property
    def refit(self) -> bool:
        return self.max_r is not None

    @property
    def shapes(self) -> Shapes:
        """The first profile (the only one of a graph without a cache)."""
        return next(iter(self.profiles.values()))

    def sidecar_profiles(self) -> list[dict[str, dict[str, list[int]]]]:
        return [
            {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()}
            for shapes in self.profiles.values()
        ]

    def trtexec(self) -> str:
        def spec(shapes: Shapes, k: int) -> str:
            return ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in shapes.items())

        args = ["trtexec", f"--onnx={self.onnx}", f"--saveEngine={self.engine}"]
        for shapes in self.profiles.values():  # one profile per repeat of the three flags
            args += [f"--{pick}Shapes={spec(shapes, k)}" for k, pick in enumerate(("min", "opt", "max"))]
        args.append(f"--timingCacheFile={self.timing_cache}")
        args += {"fp32": ["--noTF32"], "fp16": ["--fp16"], "bf16": ["--bf16"]}[self.precision]
        if self.refit:
            args.append("--refit")
        return shlex.join(args)

    def to_json(self) -> dict[str, Any]:
        data = {
            "onnx": str(self.onnx),
            "engine": str(self.engine),
            "precision": self.precision,
            **(
                {"profile": self.sidecar_profiles()[0]}
                if list(self.profiles) == [ONE]
                else {"profiles": dict(zip(self.profiles, self.sidecar_profiles()))}
            ),
            "timing_cache": str(self.timing_cache),
            "max_r": self.max_r,
            "trtexec": self.trtexec(),
            "trtexec_file": str(self.command_file) if self.command_file else None,
        }
        if self.parity is not None:
            data.update(self.parity.to_json())
        return data


def pad_pack(pack: Pack, max_r: int) -> dict[str, np.ndarray]:
    """Zero-pad every tensor of a bottleneck pack from rank r to `max_r` (exact: see the module docstring)."""
    r = pack.rank
    out = {}
    for name, t in pack.tensors.items():
        kind = name.rsplit(".", 1)[-1]
        a = t.detach().to(torch.float32).numpy()
        widths = [(0, max_r - r if s == "r" else 0) for s in BOTTLENECK_SHAPES[kind]]
        out[name] = np.ascontiguousarray(np.pad(a, widths))
    return out


def refit_weights(meta: dict[str, str], pack: Pack, what: str = "pack") -> dict[str, np.ndarray]:
    """The weights a refit sets, by TensorRT weight name (= ONNX initializer name), padded to the engine's rank.

    `meta` is the metadata of the refittable ONNX (also kept in the engine's sidecar). Refuses a pack made for
    another base/method/activation/sites, with missing, extra or misshapen tensors, or of a rank above max_r.
    """
    slots = SwappableMeta.from_metadata(meta, what)
    if slots.max_rank is None:
        raise SurgeryError(f"{what}: the engine is not refittable; build it with --swappable --max-r R")
    check_pack(pack, slots.fingerprint, slots.widths, max_rank=slots.max_rank, name=what)
    return pad_pack(pack, slots.max_rank)


def refittable_onnx(captured: Captured, max_r: int, pack: Pack | None = None) -> onnx.ModelProto:
    """The adapted model's ONNX with its adapter initializers at rank `max_r`, filled from `pack` (default: its own).

    Traced with distinct random adapter values so that the exporter keeps one named initializer per tensor
    (it merges identical ones), then every adapter initializer is overwritten with the padded pack.
    """
    manifest = captured.manifest
    if manifest is None:
        raise SurgeryError(f"{captured.source.name}: --swappable needs an adapted model; run `surgery insert` first")
    slots = SwappableMeta.of(manifest, "--swappable --trt", max_rank=max_r)
    if not 1 <= max_r < min(slots.widths.values()):
        raise SurgeryError(f"--max-r {max_r}: the rank must be in 1..{min(slots.widths.values()) - 1} for this model")
    pack = pack or pack_from_model(captured.gm.state_dict(), manifest)
    meta = slots.to_metadata()
    padded = refit_weights(meta, pack, f"--max-r {max_r}: the model's own adapters")
    program = onnx_program(_with_adapters(captured.gm, "random"), captured.signature, captured.source.name, OPSET)
    proto = program.model_proto
    found = {init.name: init for init in proto.graph.initializer if init.name in padded}
    assert set(found) == set(padded), f"exporter lost adapter initializers: {sorted(set(padded) - set(found))[:3]}"
    for name, array in padded.items():
        found[name].CopyFrom(numpy_helper.from_array(array, name))
    del proto.graph.value_info[:]  # shapes inferred at the traced rank no longer hold
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return proto


def weight_names(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Adapter weights as TensorRT's ONNX parser will name them: initializer name -> shape.

    Raises if an adapter initializer is not consumed directly by a MatMul or Add: behind a Transpose or a
    Reshape the builder would fold it into an anonymous constant, and a refit could not address it.
    """
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer if i.name.startswith(ADAPTER_ROOT + ".")}
    consumers: dict[str, set[str]] = {n: set() for n in inits}
    for node in model.graph.node:
        for name in node.input:
            if name in consumers:
                consumers[name].add(node.op_type)
    for name, ops in consumers.items():
        if not ops or not ops <= {"MatMul", "Add"}:
            raise SurgeryError(
                f"adapter tensor {name} feeds {sorted(ops) or 'nothing'}, not MatMul/Add: it would not stay refittable"
            )
    return inits


def _write_command(plan: TrtPlan) -> Path:
    path = plan.engine.with_name(plan.engine.name + ".trtexec.sh")
    with atomic_output(path) as tmp:
        tmp.write_text(
            f"#!/bin/sh\n# Build {plan.engine.name} with TensorRT's trtexec "
            "(what `surgery export --trt` does in Python)\n" + plan.trtexec().replace(" --", " \\\n  --") + "\n"
        )
    return path


def prepare_trt(
    captured: Captured,
    engine: str | Path,
    *,
    precision: str = "fp32",
    shapes: str | list[str] | dict[str, AxisRange] | None = None,
    max_r: int | None = None,
    timing_cache: str | Path | None = None,
    tolerance: float = ATOL,
    rtol: float = RTOL,
    external: bool = False,
) -> TrtPlan:
    """Write the TensorRT-ready ONNX beside `engine` (verified in ONNX Runtime) and the trtexec command file.
    Past 2 GB of initializers (or with `external`) that ONNX is NAME.onnx + NAME.onnx.data. `shapes` is `--engine-shape`
    (`plan_profiles`): one profile, or a cache graph's prefill and decode profiles."""
    if precision not in PRECISIONS:
        raise SurgeryError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    engine = Path(engine)
    profiles = plan_profiles(captured.signature, shapes)
    onnx_path = engine.with_suffix(".refit.onnx" if max_r is not None else ".onnx")
    plan = TrtPlan(
        onnx=onnx_path,
        engine=engine,
        precision=precision,
        profiles=profiles,
        timing_cache=Path(timing_cache) if timing_cache else engine.parent / "timing.cache",
        max_r=max_r,
    )
    if max_r is None:
        plan.parity = export_onnx(
            captured.gm, captured.signature, onnx_path, tolerance=tolerance, rtol=rtol, manifest=captured.manifest,
            external=external,
        ).parity  # fmt: skip
    else:
        proto = refittable_onnx(captured, max_r)
        weight_names(proto)
        with atomic_onnx(onnx_path) as tmp:
            save_onnx(proto, tmp, external)
            check_model(tmp, str(onnx_path))
            plan.parity = check_onnx(tmp, captured.gm, captured.signature, tolerance=tolerance, rtol=rtol)
            refuse_mismatch(plan.parity, str(onnx_path), f" with the adapters zero-padded to rank {max_r}")
        plan.meta = {p.key: p.value for p in proto.metadata_props}
    plan.command_file = _write_command(plan)
    return plan


# --- building, refitting, running (TensorRT and a GPU) ----------------------------------------------------


def gpu_name() -> str:
    """The CUDA device's name, from torch or nvidia-smi; 'unknown' when neither can tell."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "unknown"


def sidecar_path(engine: str | Path) -> Path:
    return Path(str(engine) + SIDECAR_SUFFIX)


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    path = sidecar_path(engine)
    if not Path(engine).is_file():
        raise SurgeryError(f"{engine}: no such engine file")
    if not path.is_file():
        raise SurgeryError(f"{engine}: its sidecar {path.name} is missing; rebuild with `surgery export --trt`")
    try:
        sidecar = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise SurgeryError(
            f"{engine}: its sidecar {path.name} is not JSON ({exc}); rebuild with `surgery export --trt`"
        ) from exc
    if not isinstance(sidecar, dict):
        raise SurgeryError(
            f"{engine}: its sidecar {path.name} is not a JSON object; rebuild with `surgery export --trt`"
        )
    return sidecar


def _write_engine(path: Path, data: bytes, sidecar: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
        with atomic_output(sidecar_path(path)) as side:
            side.write_text(json.dumps(sidecar, indent=1) + "\n")


def build_engine(plan: TrtPlan) -> dict[str, Any]:
    """Parse the plan's ONNX, build a serialized engine, write it atomically with its sidecar; returns the sidecar.

    Polygraphy's `CreateConfig` sets `BuilderFlag.FP16`/`BF16`/`REFIT`, adds the optimization profile
    (`IOptimizationProfile.set_shape` per input), loads the timing cache (`IBuilderConfig.create_timing_cache`
    + `set_timing_cache`) and clears TF32 (so fp32 means fp32); `EngineBytesFromNetwork` calls
    `Builder.build_serialized_network` and merges the timing cache back into the file.
    """
    trt = require_tensorrt()
    if plan.precision != "fp32" and not hasattr(trt.BuilderFlag, plan.precision.upper()):
        # TensorRT 11 removed BuilderFlag.FP16/BF16 (networks are always strongly typed).
        raise SurgeryError(
            f"TensorRT {trt.__version__}: --fp16/--bf16 use BuilderFlag.FP16/BF16 of TensorRT 10; install tensorrt 10.x"
        )
    if gpu_name() == "unknown":
        raise TensorRTMissing("no CUDA GPU found: TensorRT builds engines on the GPU that will run them", plan)
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profiles = []
    for shapes in plan.profiles.values():  # IBuilderConfig.add_optimization_profile, in order: index = position
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        profiles.append(profile)
    config = CreateConfig(
        fp16=plan.precision == "fp16",
        bf16=plan.precision == "bf16",
        refittable=plan.refit,
        profiles=profiles,
        load_timing_cache=str(plan.timing_cache),
    )
    start = time.perf_counter()
    # NetworkFromOnnxPath calls OnnxParser.parse_from_file (external weights resolve beside the file).
    data = EngineBytesFromNetwork(
        NetworkFromOnnxPath(str(plan.onnx)), config=config, save_timing_cache=str(plan.timing_cache)
    )()
    sidecar = {
        "tensorrt": trt.__version__,
        "gpu": gpu_name(),
        "host": platform.node(),
        "precision": plan.precision,
        "profiles": plan.sidecar_profiles(),
        "profile_names": list(plan.profiles),
        "source_onnx": str(plan.onnx),
        "source_sha256": sha256_of(plan.onnx),
        "refittable": plan.refit,
        "max_r": plan.max_r,
        "onnx_meta": plan.meta,
        "build_seconds": round(time.perf_counter() - start, 2),
        "timing_cache": str(plan.timing_cache),
    }
    _write_engine(plan.engine, bytes(data), sidecar)
    return sidecar


def _deserialize(trt: Any, data: bytes) -> Any:
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise SurgeryError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
    return engine, logger


def refit_engine(engine_path: str | Path, pack_path: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Refit a refittable engine's adapter weights from a pack (no rebuild); write it atomically (in place by default).

    Follows "Refitting an Engine": `trt.Refitter(engine, logger)`, `set_named_weights(name, Weights)` per adapter
    tensor, `get_missing_weights()` must be empty, then `refit_cuda_engine()`; the refitted engine is
    re-serialized with `ICudaEngine.serialize()`.
    """
    engine_path = Path(engine_path)
    sidecar = read_sidecar(engine_path)
    pack = load_pack(pack_path)
    weights = refit_weights(sidecar.get("onnx_meta", {}), pack, f"pack {pack_path}")  # refusals before TensorRT
    trt = require_tensorrt()
    engine, logger = _deserialize(trt, engine_path.read_bytes())
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    absent = sorted(set(weights) - refittable)
    if absent:
        raise SurgeryError(
            f"{engine_path}: the engine has no refittable weight {absent[0]!r}; rebuild it with --swappable"
        )
    for name, array in weights.items():
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise SurgeryError(f"{engine_path}: TensorRT refused weights {name} of shape {list(array.shape)}")
    missing = refitter.get_missing_weights()
    if missing:
        raise SurgeryError(
            f"{engine_path}: the refit also needs {len(missing)} weights the pack does not hold, e.g. {missing[0]}"
        )
    if not refitter.refit_cuda_engine():
        raise SurgeryError(f"{engine_path}: refit_cuda_engine failed")
    sidecar = {**sidecar, "pack": {"path": str(pack_path), "rank": pack.rank, "fingerprint": pack.fingerprint}}
    _write_engine(Path(output or engine_path), bytes(engine.serialize()), sidecar)
    return sidecar


def engine_runner(engine_path: str | Path) -> Any:
    """A Polygraphy `TrtRunner` over the engine (deserialized by `EngineFromBytes`); use it as a context manager."""
    require_tensorrt()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))


def _use_profile(runner: Any, sidecar: dict[str, Any], feeds: dict[str, np.ndarray], what: str) -> None:
    """Activate the profile that takes `feeds` (a cache engine: prefill or decode); one profile needs no choice."""
    profiles = sidecar.get("profiles", [])
    if len(profiles) > 1:
        shapes = {n: a.shape for n, a in feeds.items()}
        runner.set_profile(pick_profile(profiles, shapes, what, sidecar.get("profile_names", [])))


def run_engine(engine_path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine once on host arrays, in the profile that takes their shapes; outputs by name
    (`TrtRunner.infer` copies in and out)."""
    sidecar = read_sidecar(engine_path)
    with engine_runner(engine_path) as runner:
        _use_profile(runner, sidecar, feeds, str(engine_path))
        return {k: np.asarray(v) for k, v in runner.infer(feed_dict=feeds).items()}


# Largest |engine - torch| accepted by engine precision, as (atol, rtol x max|torch|). fp32 engines are built with TF32
# off, yet GPU kernels order their reductions differently from torch on the CPU (ONNX Runtime on the CPU measures about
# 3e-6 on MiniLM); fp16 keeps 10 mantissa bits (unit roundoff 4.9e-4) and bf16 7 (3.9e-3), compounded over the layers.
# These are starting points: they have not yet been measured against a real engine.
ENGINE_TOLERANCE = {"fp32": (1e-3, RTOL), "fp16": (2e-2, 1e-2), "bf16": (1e-1, 5e-2)}


def check_engine(
    engine: str | Path,
    module: Any,
    signature: Signature,
    precision: str,
    sizes: list[dict[str, int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> Parity:
    """Run a TensorRT engine (Polygraphy's TrtRunner) on padded batches and compare with torch per output, within
    the precision's `ENGINE_TOLERANCE` unless `atol`/`rtol` say otherwise. An engine of several profiles (a cache
    graph's prefill and decode) is checked by default at one shape inside each, run in the profile that takes it."""
    default_atol, default_rtol = ENGINE_TOLERANCE[precision]
    sidecar = read_sidecar(engine)
    profiles = sidecar.get("profiles", [])
    if sizes is None and len(profiles) > 1:
        sizes = profile_sizes(signature, profiles)

    def run(tensors: list[torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
        wanted = set(runner.get_input_metadata().keys())  # an unused input may have been dropped
        feeds = {n: t.numpy() for n, t in zip(signature.names, tensors) if n in wanted}
        _use_profile(runner, sidecar, feeds, str(engine))
        got = runner.infer(feed_dict=feeds)
        return list(got), [np.asarray(v) for v in got.values()]

    with engine_runner(engine) as runner:
        return check(
            run,
            module,
            signature,
            atol=default_atol if atol is None else atol,
            rtol=default_rtol if rtol is None else rtol,
            sizes=sizes,
        )
