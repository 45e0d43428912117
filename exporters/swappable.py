"""Swappable ONNX: the base graph with adapter slots that packs fill at run time.

Every adapter tensor becomes an *overridable initializer*: a graph input and an initializer of the same
name. The rank is the symbolic dimension `adapter_rank`, and the defaults have rank 0 (`down_w` is
(d, 0), `up_w` (0, d), `up_b` zeros), so with no pack active the bottleneck adds exactly zero and the
model is the base model; a pack of any rank 1..d-1 plugs in through ONNX Runtime's adapter mechanism.

The dynamo exporter merges identical initializers (all-zero biases, say), which would lose names, so
the export is traced with distinct random adapter values, then the defaults are written in the proto.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from exporters.onnx import (
    check_model,
    lean_proto,
    onnx_program,
    quantized_json,
    refuse_mismatch,
    worst,
    written,
)
from exporters.onnx_files import atomic_onnx, save_onnx
from exporters.runtime import AdaptedSession
from exporters.slots import SwappableMeta
from exporters.verify import check_session, feeds, ort_session
from surgery.bundle import Manifest
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.packs import BOTTLENECK_SHAPES, pack_from_model
from surgery.parity import ATOL, RTOL, Parity, compare, mask_of, outputs_of, own_noise
from surgery.route import route
from surgery.sites import ADAPTER_ROOT

if TYPE_CHECKING:
    from exporters.quantize import Quantization, QuantReport

RANK = "adapter_rank"
ROUTE_META = "surgery.adapter_ids"  # a routed export's metadata: JSON list of adapter names, indexed by adapter_id


def route_names(metadata: dict[str, str]) -> list[str] | None:
    """A routed export's adapter names by `adapter_id`, from its ONNX metadata (None: not a routed export)."""
    import json

    text = metadata.get(ROUTE_META)
    return None if text is None else [str(n) for n in json.loads(text)]


@dataclass(frozen=True)
class SwappableExport:
    path: Path
    base_parity: Parity  # no pack active, against the base model in torch
    pack_parity: Parity  # the model's own adapter as a pack, against the adapted model in torch
    slots: int
    seconds: float
    data: Path | None = None  # NAME.onnx.data, where the tensors are external
    quantization: QuantReport | None = None  # a quantized base (exporters/quantize.py)

    def to_json(self) -> dict[str, Any]:
        return {
            **written(self.path, self.data),
            "swappable": True,
            "adapter_tensors": self.slots,
            "export_seconds": round(self.seconds, 2),
            **worst(self.base_parity, self.pack_parity),
            "no_pack": self.base_parity.to_json(),
            "own_pack": self.pack_parity.to_json(),
            **quantized_json(self.quantization),
        }


def _default(kind: str, d: int, elem_type: int = onnx.TensorProto.FLOAT) -> onnx.TensorProto:
    """The rank-0 default of a slot, in the model's dtype (`elem_type`): (d, 0), (0,), (0, d) or zeros (d,)."""
    shape = tuple(d if s == "d" else 0 for s in BOTTLENECK_SHAPES[kind])
    return onnx.helper.make_tensor("", elem_type, shape, np.zeros(int(np.prod(shape)), dtype=np.float32).tolist())


def make_slots(model: onnx.ModelProto, manifest: Manifest) -> int:
    """Turn every adapter initializer into an overridable one with a rank-0 default (in place)."""
    slots = SwappableMeta.of(manifest, "--swappable")
    widths = slots.widths
    wanted = {f"{ADAPTER_ROOT}.{site}.{kind}": (kind, d) for site, d in widths.items() for kind in BOTTLENECK_SHAPES}
    found = {init.name: init for init in model.graph.initializer if init.name in wanted}
    missing = sorted(set(wanted) - set(found))
    assert not missing, f"exporter lost adapter initializers (merged or renamed): {missing[:3]}"
    for name, (kind, d) in wanted.items():
        elem_type = found[name].data_type  # the model's dtype: fp32, fp16 or bf16
        found[name].CopyFrom(_default(kind, d, elem_type))
        found[name].name = name
        dims = [d if s == "d" else RANK for s in BOTTLENECK_SHAPES[kind]]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, elem_type, dims))
    for key, value in slots.to_metadata().items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return len(wanted)


def _with_adapters(gm: torch.nn.Module, fill: str, seed: int = 0) -> torch.nn.Module:
    """A copy of `gm` whose adapter tensors are distinct random values ('random') or zero up-projections ('base')."""
    out = copy.deepcopy(gm)
    _fill(out, fill, seed)
    return out


def _fill(gm: torch.nn.Module, fill: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith(ADAPTER_ROOT + "."):
                if fill == "random":
                    p.copy_(torch.randn(p.shape, generator=g))
                elif name.endswith(("up_w", "up_b")):
                    p.zero_()


@contextmanager
def adapters_filled(gm: torch.nn.Module, fill: str, seed: int = 0) -> Iterator[torch.nn.Module]:
    """`_with_adapters` in place, for a model that cannot be copied (fake base weights, exporters/stream.py): the
    adapter tensors hold `fill` inside the block and their own values again after it."""
    saved = {n: p.detach().clone() for n, p in gm.named_parameters() if n.startswith(ADAPTER_ROOT + ".")}
    _fill(gm, fill, seed)
    try:
        yield gm
    finally:
        with torch.no_grad():
            for n, p in gm.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def export_swappable(
    captured: Captured,
    path: str | Path,
    *,
    tolerance: float = ATOL,
    rtol: float = RTOL,
    external: bool = False,
    quantize: Quantization | None = None,
    metadata: dict[str, str] | None = None,
) -> SwappableExport:
    """Export an adapted model with adapter slots, verify no-pack = base and own-pack = adapted, then write.
    `metadata`: more entries of the model's `metadata_props`.

    With `quantize` the base model's MatMul weights are quantized and the slots stay float (exporters/quantize.py);
    both checks compare with torch holding the same quantized weights."""
    if captured.manifest is None:
        raise SurgeryError(f"{captured.source.name}: --swappable needs an adapted model; run `surgery insert` first")
    start = time.perf_counter()
    what = str(path)
    proto = lean_proto(
        onnx_program(_with_adapters(captured.gm, "random"), captured.signature, what).model_proto, captured.signature
    )
    slots = make_slots(proto, captured.manifest)
    for key, value in (metadata or {}).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    quantized, reference = None, captured.gm
    if quantize is not None:
        from exporters.quantize import AT_FP32, Quantized

        quantized = Quantized.of(proto, quantize, what, captured.gm)
        proto, reference = quantized.model, quantized.reference(captured.gm)
    own_pack = pack_from_model(captured.gm.state_dict(), captured.manifest)
    sig = captured.signature

    def check(model: Path, atol: float, rtol: float, case: str = "") -> tuple[Parity, Parity]:
        """No pack against the base, the own pack against the adapted model; refused past `atol`, `rtol`."""
        session = AdaptedSession(model)
        base = _with_adapters(reference, "base")
        base_parity = check_session(session.session, base, sig, atol, rtol=rtol)
        refuse_mismatch(base_parity, what, f" with no pack active{case}")
        if session.base_session is not session.session:  # the base graph cut out for runs with no pack
            cut = check_session(session.base_session, base, sig, atol, rtol=rtol)
            refuse_mismatch(cut, what, f" as the base graph for runs with no pack{case}")
            base_parity = max(base_parity, cut, key=lambda p: p.max_abs_diff)
        session.load("own", own_pack)
        own = session.run_options("own")
        pack_parity = check_session(session.session, reference, sig, atol, run_options=own, rtol=rtol)
        refuse_mismatch(pack_parity, what, f" with the model's own pack active{case}")
        return base_parity, pack_parity

    with atomic_onnx(path) as tmp:
        data = save_onnx(proto, tmp, external)
        seconds = time.perf_counter() - start
        check_model(tmp, what)
        quant = " with the same quantized weights" if quantized else ""
        base_parity, pack_parity = check(tmp, tolerance, rtol, quant)
        report = None
        if quantized is not None:
            session = AdaptedSession(tmp)
            session.load("own", own_pack)
            report = quantized.checked(
                quantized.check_at_fp32(lambda p, a, r: check(p, a, r, AT_FP32)[1], captured.gm, what, external),
                check_session(
                    session.session, captured.gm, sig, float("inf"), run_options=session.run_options("own"), rtol=0.0
                ),
            )
    data_path = Path(path).with_name(data.name) if data else None
    return SwappableExport(Path(path), base_parity, pack_parity, slots, seconds, data_path, report)


@dataclass(frozen=True)
class RoutedExport:
    path: Path
    parity: Parity  # routed ONNX against the routed torch graph (random ids)
    rows: Parity  # row by row against each source model in torch (and the base for -1)
    ids: list[int]
    models: list[str]
    rank: int
    data: Path | None = None  # NAME.onnx.data, where the tensors are external
    names: tuple[str, ...] = ()  # the adapters' names by adapter_id (the model's metadata)
    quantization: QuantReport | None = None  # a quantized base (exporters/quantize.py)

    def to_json(self) -> dict[str, Any]:
        return {
            **written(self.path, self.data),
            "route": self.models,
            "adapter_ids": {str(i): n for i, n in enumerate(self.names)},
            "padded_rank": self.rank,
            "checked_ids": self.ids,
            **worst(self.parity, self.rows),
            "parity": self.parity.to_json(),
            "rows": self.rows.to_json(),
            **quantized_json(self.quantization),
        }


def check_rows(
    session: Any,
    routed: Captured,
    models: list[Captured],
    ids: list[int],
    tolerance: float,
    seq: int = 37,
    rtol: float = RTOL,
) -> Parity:
    """Row b of the routed ONNX output against model ids[b] in torch (the base model where ids[b] is out of range)."""
    sizes = {"batch": len(ids), "seq": seq}
    sig = models[0].signature
    tensors = sig.examples(sizes, seed=7, pad=True)
    per_model = {}
    for i in sorted(set(ids)):
        base = not 0 <= i < len(models)
        per_model[i] = outputs_of(_with_adapters(models[0].gm, "base") if base else models[i].gm, sig, tensors)
    expected = [torch.stack([per_model[i][k][b] for b, i in enumerate(ids)]) for k in range(len(per_model[ids[0]]))]
    all_tensors = tensors + [torch.tensor(ids, dtype=torch.int64)]
    got = session.run(None, feeds(session, routed.signature, all_tensors))
    names = [o.name for o in session.get_outputs()]
    mask = mask_of(sig, tensors)
    rows = compare(expected, got, atol=tolerance, rtol=rtol, names=names, mask=mask, where=f"ids {ids}")
    if not rows.ok:  # within torch's own noise? each row measured on its own model, as above
        how, own = "", {}
        for i in per_model:
            model = _with_adapters(models[0].gm, "base") if not 0 <= i < len(models) else models[i].gm
            own[i], how = own_noise(model, sig, tensors)
        noise = [torch.stack([own[i][k][b] for b, i in enumerate(ids)]) for k in range(len(expected))]
        rows = compare(
            expected, got, atol=tolerance, rtol=rtol, names=names, mask=mask, where=f"ids {ids}", noise=noise, how=how
        )
    return replace(rows, shapes=[sizes])


def export_routed(
    models: list[Captured],
    path: str | Path,
    *,
    tolerance: float = ATOL,
    rtol: float = RTOL,
    external: bool = False,
    names: list[str] | None = None,
    quantize: Quantization | None = None,
) -> RoutedExport:
    """One ONNX model with every model's adapters and an `adapter_id` input, verified row by row (an id out of
    range included: it runs the base model). `names`: the adapters' names by id (default: the source file names
    without suffixes, or `adapter<id>` where those repeat), written to the model's metadata (`ROUTE_META`).
    With `quantize` the base model's MatMul weights are quantized and the adapter stacks stay float
    (exporters/quantize.py); both checks compare with torch holding the same quantized weights."""
    import json

    what = str(path)
    routed, route_report = route(models)
    n = len(models)
    if names is None:
        names = [m.source.name.split(".")[0] for m in models]
        names = names if len(set(names)) == n else [f"adapter{i}" for i in range(n)]
    if len(names) != n or len(set(names)) != n:
        raise SurgeryError(f"--route: {n} models need {n} distinct adapter names; got {names}")
    ids = [0, n - 1, -1, 1 % n, n]
    proto = lean_proto(onnx_program(routed.gm, routed.signature, what).model_proto, routed.signature)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=ROUTE_META, value=json.dumps(names)))
    quantized, reference, sources = None, routed, models
    if quantize is not None:
        from exporters.quantize import AT_FP32, Quantized

        quantized = Quantized.of(proto, quantize, what, routed.gm)
        proto = quantized.model
        reference = dataclasses.replace(routed, gm=quantized.reference(routed.gm))
        sources = [dataclasses.replace(m, gm=quantized.reference(m.gm)) for m in models]

    def check(model: Path, atol: float, rtol: float, case: str = "") -> tuple[Parity, Parity]:
        """The routed graph against torch's, then row by row against the source models; refused past the bound."""
        session = ort_session(model)
        parity = check_session(session, reference.gm, routed.signature, atol, rtol=rtol)
        refuse_mismatch(parity, what, case)
        rows = check_rows(session, routed, sources, ids, atol, rtol=rtol)
        refuse_mismatch(rows, what, f" row by row against the source models (ids {ids}){case}")
        return parity, rows

    with atomic_onnx(path) as tmp:
        data = save_onnx(proto, tmp, external)
        check_model(tmp, what)
        quant = " with the same quantized weights" if quantized else ""
        parity, rows = check(tmp, tolerance, rtol, quant)
        report = None
        if quantized is not None:
            report = quantized.checked(
                quantized.check_at_fp32(lambda p, a, r: check(p, a, r, AT_FP32)[0], routed.gm, what, external),
                check_session(ort_session(tmp), routed.gm, routed.signature, float("inf"), rtol=0.0),
            )
    data_path = Path(path).with_name(data.name) if data else None
    models_ = [m.source.name for m in models]
    return RoutedExport(Path(path), parity, rows, ids, models_, route_report.rank, data_path, tuple(names), report)
