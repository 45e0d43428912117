"""TensorRT engines from the verified ONNX: baked (fp32/fp16/bf16) and refittable (adapter packs swapped in place).

Three stages, and only the last two need TensorRT and a GPU:

1. `prepare_trt`: the TensorRT-ready ONNX (verified in ONNX Runtime like every export), the optimization
   profiles (`exporters/trt_profiles.py`, from the capture's dynamic axes or `--engine-shape`), and the equivalent
   `trtexec` command line. A refittable engine's ONNX keeps its adapter tensors named (`exporters/trt_refit.py`).
2. `build_engine`: ONNX parser -> network -> serialized engine, through Polygraphy's loaders
   (`NetworkFromOnnxPath`, `CreateConfig`, `EngineBytesFromNetwork`), written atomically with a JSON sidecar.
3. `refit_engine`: `trt.Refitter` with a pack's tensors; running and checking an engine is `exporters/trt_run.py`.

Every function that needs TensorRT imports it where it is used and fails with the install command.
Documentation followed (TensorRT 10.x):
- ONNX parser / building: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
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

import torch

from exporters.onnx import check_model, export_onnx, refuse_mismatch
from exporters.onnx_files import atomic_onnx, save_onnx
from exporters.trt_profiles import (
    ONE,
    AxisRange,
    Shapes,
    plan_profiles,
)
from exporters.trt_refit import refit_weights, refittable_onnx, weight_names
from exporters.verify import check_onnx
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.io import atomic_output
from surgery.load import sha256_of
from surgery.packs import load_pack
from surgery.parity import ATOL, RTOL, Parity

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
