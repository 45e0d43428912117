"""The variants the latency harness compares, exported once into a work folder as `Artifact`s.

| variant | torch (.pt2) | ONNX Runtime (.onnx) |
|---|---|---|
| base | the captured base model | baked export of it |
| houlsby, pfeiffer | adapted, stand-in weights | baked export (bottlenecks fused, see surgery/fuse.py) |
| houlsby-fused | houlsby, bottlenecks fused as the baked ONNX has them (addmm, σ, addmm) | - (houlsby's ONNX is it) |
| houlsby-kernel | the same, each bottleneck one `surgery::bottleneck` op (one Triton kernel on CUDA) | - |
| houlsby-folded | houlsby with each down-projection folded into the GEMM before it (surgery/fold.py) | - |
| swappable | - | swappable export with the houlsby pack active |
| swappable-none | - | the same export with no pack |
| routed | two houlsby adapters, rows alternate between them and the base | routed export |
| lora | LoRA on q and v (rank r), stand-in weights | baked export |
| lora-merged | the same LoRA folded into the base weights (`merge_adapters`) | baked export |
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters.onnx import export_onnx
from exporters.swappable import export_swappable
from surgery.adapters import AdapterSpec, LoraSpec, stand_in_weights
from surgery.architectures import BUILTIN  # random weights; minilm-random is MiniLM's shape without its package
from surgery.capture import Captured, export_program
from surgery.errors import SurgeryError
from surgery.fold import folded_copy
from surgery.fuse import fused_copy
from surgery.packs import pack_from_model, save_pack
from surgery.pipeline import adapt, merge_model, open_model, stand_in_adapted
from surgery.route import route, strip_adapters


@dataclass(frozen=True)
class Artifact:
    """What one variant's workers load (the contract between `prepare` and `benchmarks/worker.py`):
    a .pt2 (torch backends), an ONNX (ONNX Runtime), a pack (swappable), the Signature's JSON (to make inputs)."""

    variant: str
    pt2: str | None
    onnx: str | None
    pack: str | None = None
    signature: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, str | None]) -> Artifact:
        return cls(**data)


VARIANTS = (
    "base",
    "houlsby",
    "houlsby-fused",
    "houlsby-kernel",
    "houlsby-folded",
    "pfeiffer",
    "swappable",
    "swappable-none",
    "routed",
    "lora",
    "lora-merged",
)


def open_builtin(model: str, work: Path) -> Captured:
    """`minilm`, a built-in config name (random weights), or any source `surgery` reads."""
    if model in BUILTIN:
        from transformers import AutoConfig

        kwargs = dict(BUILTIN[model])
        folder = work / model
        AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).save_pretrained(folder)
        return open_model(str(folder / "config.json"))
    return open_model(model)


def _write_signature(captured: Captured, path: Path) -> str:
    path.write_text(json.dumps(captured.signature.to_json()))
    return str(path)


def _save_program(captured: Captured, path: Path) -> str:
    torch.export.save(export_program(captured.gm, captured.signature, str(path)), path)
    return str(path)


def _adapted(base: Captured, work: Path, method: str, r: int, seed: int) -> Captured:
    return stand_in_adapted(base, AdapterSpec(method, r=r), work / f"{method}{seed}.adapted.pt2", seed)


def prepare(model: str, variants: list[str], work: Path, r: int = 8, onnx: bool = True) -> list[Artifact]:
    """Export each requested variant of `model` once; returns what the workers load.

    With `onnx=False` (torch backends only) no ONNX is written, and the ORT-only variants are left out.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SurgeryError(f"unknown variant {unknown[0]!r}; choose from: {', '.join(VARIANTS)}")
    work.mkdir(parents=True, exist_ok=True)
    base = open_builtin(model, work)
    sig = _write_signature(base, work / "signature.json")
    out = []

    def to_onnx(m: Captured, name: str) -> str | None:
        return str(export_onnx(m.gm, m.signature, work / f"{name}.onnx", manifest=m.manifest).path) if onnx else None

    if not onnx:
        variants = [v for v in variants if v not in ("swappable", "swappable-none")]
    if "base" in variants:
        out.append(Artifact("base", _save_program(base, work / "base.pt2"), to_onnx(base, "base"), signature=sig))
    uses_houlsby = {
        "houlsby",
        "houlsby-fused",
        "houlsby-kernel",
        "houlsby-folded",
        "swappable",
        "swappable-none",
        "routed",
    }
    houlsby = _adapted(base, work, "houlsby", r, 0) if uses_houlsby & set(variants) else None
    for method in ("houlsby", "pfeiffer"):
        if method in variants:
            m = houlsby if method == "houlsby" else _adapted(base, work, method, r, 0)
            out.append(Artifact(method, m.source.path, to_onnx(m, method), signature=sig))
    for name in ("houlsby-fused", "houlsby-kernel"):
        if name in variants:
            fused = dataclasses.replace(
                houlsby, gm=fused_copy(houlsby.gm, houlsby.manifest, kernel=name == "houlsby-kernel")
            )
            out.append(Artifact(name, _save_program(fused, work / f"{name}.pt2"), None, signature=sig))
    if "houlsby-folded" in variants:
        gm = folded_copy(houlsby.gm, houlsby.manifest)
        if gm is None:
            raise SurgeryError(
                f"houlsby-folded: {model}'s adapted projections have no bias to fold into; leave the variant out"
            )
        folded = dataclasses.replace(houlsby, gm=gm)
        out.append(Artifact("houlsby-folded", _save_program(folded, work / "houlsby-folded.pt2"), None, signature=sig))
    if {"swappable", "swappable-none"} & set(variants):
        onnx_path = str(export_swappable(houlsby, work / "swappable.onnx").path)
        pack = str(save_pack(pack_from_model(houlsby.gm.state_dict(), houlsby.manifest), work / "houlsby.onnx_adapter"))
        if "swappable" in variants:
            out.append(Artifact("swappable", None, onnx_path, pack=pack, signature=sig))
        if "swappable-none" in variants:
            out.append(Artifact("swappable-none", None, onnx_path, signature=sig))
    if "routed" in variants:
        routed, _ = route([houlsby, _adapted(base, work, "houlsby", r, 1)])
        routed_sig = _write_signature(routed, work / "routed.signature.json")
        out.append(
            Artifact(
                "routed", _save_program(routed, work / "routed.pt2"), to_onnx(routed, "routed"), signature=routed_sig
            )
        )
    if {"lora", "lora-merged"} & set(variants):
        lora = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
        report = adapt(lora, LoraSpec.parse(str(r), "q,v"))
        stand_in_weights(lora.gm)
        if "lora" in variants:
            out.append(Artifact("lora", _save_program(lora, work / "lora.pt2"), to_onnx(lora, "lora"), signature=sig))
        if "lora-merged" in variants:
            merge_model(lora, report.sites)
            out.append(
                Artifact(
                    "lora-merged",
                    _save_program(lora, work / "lora-merged.pt2"),
                    to_onnx(lora, "lora-merged"),
                    signature=sig,
                )
            )
    return out


def prepare_adapted(source: str, work: Path, kernel: bool = False) -> list[Artifact]:
    """`surgery bench SOURCE`: the adapted model, its base (adapters stripped) and, for bottlenecks, swappable.

    With `kernel` (for torch on CUDA), also bottlenecks as one Triton kernel each: `export --fused-pt2`'s program.
    """
    work.mkdir(parents=True, exist_ok=True)
    adapted = open_model(source)
    if adapted.manifest is None:
        raise SurgeryError(
            f"{source} is not an adapted model; bench compares it with its base: run `surgery insert` first"
        )
    sig = _write_signature(adapted, work / "signature.json")
    base = open_model(source)
    strip_adapters(base.gm, base.manifest)
    out = [
        Artifact(
            "base",
            _save_program(base, work / "base.pt2"),
            str(export_onnx(base.gm, base.signature, work / "base.onnx").path),
            signature=sig,
        ),
        Artifact(
            adapted.manifest.adapter.method,
            source,
            str(export_onnx(adapted.gm, adapted.signature, work / "adapted.onnx", manifest=adapted.manifest).path),
            signature=sig,
        ),
    ]
    if adapted.manifest.adapter.method in ("houlsby", "pfeiffer"):  # the methods with swappable slots
        onnx_path = str(export_swappable(adapted, work / "swappable.onnx").path)
        pack = str(save_pack(pack_from_model(adapted.gm.state_dict(), adapted.manifest), work / "adapted.onnx_adapter"))
        out.append(Artifact("swappable", None, onnx_path, pack=pack, signature=sig))
        if kernel:
            from exporters.kernel_program import export_kernel_program

            fused = export_kernel_program(adapted, work / "adapted.fused.pt2").path
            out.append(Artifact("fused-pt2", str(fused), None, signature=sig))
    return out
