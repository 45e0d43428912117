"""Streamed ONNX export: the graph of a weightless capture (surgery/meta.py), its base weights copied from the
checkpoint's safetensors shards into NAME.onnx.data one tensor at a time, in the target dtype.

    capture_meta(folder) -> adapters inserted (real, small) -> torch.onnx.export over fake weights (graph only)
    -> each initializer an external reference (location, offset, length) -> NAME.onnx
    -> the shards read tensor by tensor into NAME.onnx.data at those offsets

The model is never held in memory, once or twice: peak memory is the graph, the largest tensor and the OS's
page cache. Both files are written as a pair (`atomic_onnx`). The graph is optimized (onnxscript) with the
weights held aside as inputs, so nothing folds them: a Linear's weight stays the checkpoint's tensor under its
own name, transposed by the graph (ONNX Runtime folds that Transpose when it loads the model).

The same path writes a swappable export (`swappable=True`: the adapter tensors become slots as exporters/swappable.py
makes them, checked block by block with no pack and with the model's own pack, which is written beside the pair) and
a causal LM with its KV cache (a `capture_meta` of task causal-lm: the cache layout of surgery/tasks.py, opset 23).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch

from exporters.blockwise import BlockwiseReport, verify_blockwise
from exporters.onnx import check_model, lean_proto, onnx_program
from exporters.onnx_files import DATA, atomic_onnx
from exporters.slots import SwappableMeta
from exporters.swappable import adapters_filled, make_slots
from surgery.errors import SurgeryError
from surgery.fuse import fused_copy
from surgery.meta import MetaCaptured, is_fake
from surgery.packs import pack_from_model, save_pack
from surgery.sites import ADAPTER_ROOT
from surgery.parity import ATOL, RTOL

if TYPE_CHECKING:
    from exporters.quantize import Quantization, QuantReport
    from exporters.stream_quant import Planned

INLINE = 1024  # bytes: smaller tensors (shapes, scalars) stay in the graph, as save_onnx leaves them
ALIGN = 4096  # offsets of the data file: page-aligned, so ONNX Runtime can map tensors in place

Progress = Callable[[int, int], None]  # (tensors written, of how many)


@dataclass(frozen=True)
class StreamExport:
    """A streamed export: the pair written, the tensors and bytes of its data file, how long it took."""

    path: Path
    data: Path
    tensors: int  # in the data file: base weights from the checkpoint, adapters and buffers from memory
    from_checkpoint: int
    data_bytes: int
    seconds: float  # the export, without the verification
    blocks: BlockwiseReport | None = None  # the block-wise verification, where it ran (swappable: own pack active)
    verify_seconds: float = 0.0
    slots: int = 0  # swappable: the adapter slots (overridable initializers)
    no_pack: BlockwiseReport | None = None  # swappable: the block-wise verification with no pack active
    pack: Path | None = None  # swappable: the model's own adapters as a pack
    quantization: QuantReport | None = None  # --quantize: what was quantized, checked at fp32 compute (levels 2-4)

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.path),
            "external_data": str(self.data),
            "tensors": self.tensors,
            "from_checkpoint": self.from_checkpoint,
            "data_bytes": self.data_bytes,
            "export_seconds": round(self.seconds, 2),
            "verify_seconds": round(self.verify_seconds, 2),
            "blockwise": self.blocks.to_json() if self.blocks else None,
            **(
                {
                    "swappable": True,
                    "adapter_tensors": self.slots,
                    "blockwise_no_pack": self.no_pack.to_json() if self.no_pack else None,
                    "pack": str(self.pack) if self.pack else None,
                }
                if self.slots
                else {}
            ),
            **({"quantization": self.quantization.to_json()} if self.quantization else {}),
        }


@dataclass(frozen=True)
class Slot:
    """One tensor of the data file: where it goes, and where it comes from (a checkpoint key or a real tensor)."""

    name: str
    offset: int
    length: int
    key: str | None = None  # checkpoint tensor name
    dtype: torch.dtype | None = None  # what the graph takes it in
    tensor: torch.Tensor | None = None  # adapters, buffers, constants the exporter made


def _optimize_around(model: Any, held: list[Any]) -> None:
    """onnxscript's optimizer over `model` with the `held` initializers (fake weights) made graph inputs for the
    while: it folds what it can compute (shapes, casts, constants) and leaves the weights as they are."""
    import onnxscript

    graph = model.graph
    values = {}
    for v in held:
        graph.initializers.pop(v.name)
        values[v.name], v.const_value = v.const_value, None
        graph.inputs.append(v)
    try:
        onnxscript.optimizer.optimize(model)
    finally:
        for v in held:
            graph.inputs.remove(v)
            v.const_value = values[v.name]
            graph.register_initializer(v)


def _raw(value: Any) -> torch.Tensor | None:
    raw = getattr(value.const_value, "raw", None)
    return raw if isinstance(raw, torch.Tensor) else None


def export_streamed(
    captured: MetaCaptured,
    path: str | Path,
    *,
    swappable: bool = False,
    pack: str | Path | None = None,
    verify: bool = True,
    tolerance: float = ATOL,
    rtol: float = RTOL,
    progress: Progress | None = None,
    verify_progress: Callable[[str], None] | None = None,
    quantize: Quantization | None = None,
) -> StreamExport:
    """Write `captured` (a weightless capture, adapters inserted or not) as NAME.onnx + NAME.onnx.data, its base
    weights streamed from the checkpoint; with `verify`, checked block by block (exporters/blockwise.py) before
    the pair is moved into place: a model that fails is not written.

    `swappable` (an adapted capture with its manifest): the adapter tensors become slots as in
    exporters/swappable.py (overridable initializers, rank-0 defaults, in the graph: they are small), verified block
    by block twice: no pack against the base model, the model's own adapters against the adapted one; these are
    then written as the pack `pack` (`.onnx_adapter` or `.safetensors`, see `pack_beside`) before the pair moves into
    place.

    `quantize`: the base MatMul weights quantized one at a time as they are written (exporters/stream_quant.py),
    adapters float, bottlenecks unfused (as in the in-memory export); the block-wise check runs torch with the
    written blocks dequantized, and at accuracy levels 2 to 4 a second time at fp32 compute."""
    import onnx_ir as ir

    assert captured.checkpoint is not None and captured.keys is not None
    start = time.perf_counter()
    path = Path(path)
    if swappable and captured.manifest is None:
        raise SurgeryError(f"{path}: a swappable export needs adapters; insert them first (--method)")
    if swappable:
        SwappableMeta.of(captured.manifest, "--swappable")  # bottleneck adapters only: refused before the export
    if quantize is not None and captured.dtype == torch.bfloat16:
        raise SurgeryError(
            f"{path}: --quantize of a bf16 model: MatMulNBits takes fp32 or fp16 activations; export with "
            "--dtype fp32 (or fp16)"
        )
    adapter = lambda v: swappable and v.name.startswith(ADAPTER_ROOT + ".")  # noqa: E731  a slot, not a weight
    # swappable: traced with distinct random adapter values (the exporter merges identical initializers)
    # baked: bottlenecks in the fused export form, base weights untouched (surgery/fuse.py's unit rank)
    unfused = swappable or quantize is not None
    gm = captured.gm if unfused else fused_copy(captured.gm, captured.manifest, fold_bias=False) or captured.gm
    with adapters_filled(gm, "random") if swappable else nullcontext():
        program = onnx_program(gm, captured.signature, str(path), optimize=False)
    model = program.model
    names = {id(p): n for n, p in gm.named_parameters()}
    held = [
        v for v in model.graph.initializers.values() if _raw(v) is not None and (is_fake(_raw(v)) or adapter(v))
    ]  # fmt: skip
    _optimize_around(model, held)
    data = path.with_name(path.name + DATA)
    slots, offset = [], 0
    for v in list(model.graph.initializers.values()):
        raw = _raw(v)
        fake = raw is not None and is_fake(raw)
        key = captured.keys.get(v.name) or captured.keys.get(names.get(id(raw), "")) if fake else None
        if fake and key is None:
            raise SurgeryError(f"{path}: the weight {v.name} has no checkpoint tensor; nothing was written")
        if not fake and (raw is None or raw.numel() * raw.element_size() < INLINE or adapter(v)):
            continue  # a small constant, or a slot (make_slots writes its default): stays in the graph
        length = int(math.prod(int(d) for d in v.shape) * v.dtype.itemsize)
        offset = -(-offset // ALIGN) * ALIGN
        slots.append(Slot(v.name, offset, length, key, raw.dtype, None if fake else raw.detach()))
        v.const_value = ir.ExternalTensor(data.name, offset, length, v.dtype, shape=v.shape, name=v.name)
        offset += length
    proto = ir.serde.serialize_model(model)
    lean_proto(proto, captured.signature)  # the form the in-memory export writes
    slots_made = make_slots(proto, captured.manifest) if swappable else 0
    planned: dict[str, Planned] = {}
    if quantize is not None:
        from exporters.stream_quant import plan

        planned, head, adapter_nodes = plan(proto, {s.name: s.key for s in slots if s.key is not None}, quantize)
        for s in slots:
            if s.key in planned:
                planned[s.key].dtype = s.dtype
        slots, offset = _compact(proto, [s for s in slots if s.key not in planned])
    weights_as = None
    quant_report = None
    with atomic_onnx(path) as tmp:
        tmp_data = tmp.with_name(data.name)
        offset = _write_data(tmp_data, slots, captured, progress, planned, quantize, str(path))
        if quantize is not None:
            from exporters.stream_quant import dequantized, report as quant_summary, rewrite

            rewrite(proto, planned, data.name, quantize)
            quant_report = quant_summary(proto, planned, quantize, head, adapter_nodes, str(path))
            done = {k: p for k, p in planned.items() if p.written is not None}
            weights_as = lambda key, t: dequantized(done[key], tmp_data, t.dtype) if key in done else t  # noqa: E731
        onnx.save(proto, str(tmp))
        tmp_data.chmod(tmp.stat().st_mode & 0o777)
        check_model(tmp, str(path))
        seconds = time.perf_counter() - start
        report = no_pack = None
        checked = dict(tolerance=tolerance, rtol=rtol, progress=verify_progress, weights_as=weights_as)
        if verify and swappable:
            with adapters_filled(captured.gm, "base"):  # torch: zero up-projections; ORT: the rank-0 defaults
                no_pack = verify_blockwise(captured, tmp, **checked)
            _refuse(no_pack, path, " with no pack active")
            own = {n: p.detach() for n, p in captured.gm.named_parameters() if n.startswith(ADAPTER_ROOT + ".")}
            report = verify_blockwise(captured, tmp, overrides=own, **checked)
            _refuse(report, path, " with the model's own pack active")
        elif verify:
            report = verify_blockwise(captured, tmp, **checked)
            _refuse(report, path, " with the same quantized weights" if quantize else "")
        if verify and quant_report is not None and quantize is not None and quantize.accuracy_level not in (0, 1):
            quant_report = replace(quant_report, reference=_at_fp32(captured, proto, tmp, checked, path))
        written = None
        if swappable and pack is not None:  # before the pair moves into place: a pack that fails leaves neither
            assert captured.manifest is not None
            written = save_pack(pack_from_model(captured.gm.state_dict(), captured.manifest), pack)
    from_checkpoint = sum(s.key is not None for s in slots) + len(planned)  # float, and quantized as written
    verified = time.perf_counter() - start - seconds
    return StreamExport(
        path, data, len(slots) + sum(len(p.places) for p in planned.values()), from_checkpoint, offset, seconds,
        report, verified if verify else 0.0, slots_made, no_pack, written, quant_report,
    )  # fmt: skip


def _compact(proto: onnx.ModelProto, slots: list[Slot]) -> tuple[list[Slot], int]:
    """`slots` laid out again one after another (the quantized weights' places taken out), the graph's external
    references moved with them; the slots and the end of the last."""
    offset, laid = 0, []
    for s in slots:
        offset = -(-offset // ALIGN) * ALIGN
        laid.append(replace(s, offset=offset))
        offset += s.length
    where = {s.name: s.offset for s in laid}
    for t in proto.graph.initializer:
        if t.name in where:
            for e in t.external_data:
                if e.key == "offset":
                    e.value = str(where[t.name])
    return laid, offset


def _at_fp32(captured: MetaCaptured, proto: onnx.ModelProto, tmp: Path, checked: dict, path: Path) -> Any:
    """Accuracy levels 2 to 4: the same pair at fp32 compute checked block by block against the same dequantized
    weights at the dtype's own tolerance, so the weights are held tightly where the activations' rounding is not.
    The whole verification, as one Parity (its worst part)."""
    from exporters.quantize import AT_FP32
    from exporters.stream_quant import at_level
    from surgery.parity import tolerances

    atol, rtol = tolerances(captured.dtype)
    fp32 = tmp.with_name(f".{tmp.name}.fp32.onnx")
    try:
        onnx.save(at_level(proto, 1), str(fp32))
        report = verify_blockwise(captured, fp32, **{**checked, "tolerance": atol, "rtol": rtol})
    finally:
        fp32.unlink(missing_ok=True)
    _refuse(report, path, AT_FP32)
    worst = report.parts[0].parity
    for part in report.parts[1:]:
        worst = worst.combine(part.parity)
    return worst


def pack_beside(path: str | Path, dtype: torch.dtype) -> Path:
    """Where a streamed swappable export's own pack goes: NAME.onnx_adapter beside NAME(.swappable).onnx, or
    NAME.pack.safetensors for a bf16 model (ONNX Runtime's adapter writer has no bfloat16)."""
    path = Path(path)
    stem = path.name.split(".")[0]
    return path.with_name(stem + (".pack.safetensors" if dtype == torch.bfloat16 else ".onnx_adapter"))


def _refuse(report: BlockwiseReport, path: Path, case: str = "") -> None:
    if not report.ok:
        raise SurgeryError(
            f"{path}: ONNX Runtime differs from torch{case} by more than --atol + --rtol x max|torch| allow, "
            f"block by block: {report.summary()}; nothing was written"
        )


def _write_data(
    data: Path, slots: list[Slot], captured: MetaCaptured, progress: Progress | None,
    planned: dict[str, Planned] | None = None, quantize: Quantization | None = None, what: str = "",
) -> int:  # fmt: skip
    """The data file: each slot's bytes at its offset; checkpoint tensors one at a time, shard by shard. `planned`
    tensors are quantized as they are read and their arrays appended after the slots
    (exporters/stream_quant.py); returns the file's length."""
    assert captured.checkpoint is not None
    planned = planned or {}
    by_key: dict[str, list[Slot]] = {}
    for s in slots:
        if s.key is not None:
            by_key.setdefault(s.key, []).append(s)
    end = max((s.offset + s.length for s in slots), default=0)
    done = 0
    total = len(slots) + len(planned)
    with open(data, "wb") as f:

        def put(slot: Slot, t: torch.Tensor) -> None:
            nonlocal done
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            if raw.nbytes != slot.length:
                raise SurgeryError(
                    f"{slot.name}: the checkpoint's tensor has {raw.nbytes} bytes, the graph's {slot.length}; "
                    "the folder's weights do not match its config.json"
                )
            f.seek(slot.offset)
            f.write(memoryview(raw))
            done += 1
            if progress is not None:
                progress(done, total)

        for s in slots:
            if s.tensor is not None:
                put(s, s.tensor)
        dtypes = {k: ss[0].dtype for k, ss in by_key.items()}
        dtypes.update({k: p.dtype for k, p in planned.items()})
        for key, t in captured.checkpoint.read(dtypes):
            for s in by_key.get(key, []):
                put(s, t)
            if key in planned:
                assert quantize is not None
                from exporters.stream_quant import quantize_into

                end, quantized = quantize_into(f, planned[key], t, quantize, end, what)
                if not quantized:  # left float by the quantizer: the float weight after the others
                    end = -(-end // ALIGN) * ALIGN
                    slot = Slot(planned[key].name, end, t.numel() * t.element_size(), key, t.dtype)
                    planned[key].places["float"] = (end, slot.length, tuple(t.shape), 0)
                    put(slot, t)  # counted there
                    end += slot.length
                else:
                    done += 1
                    if progress is not None:
                        progress(done, total)
            del t
        f.truncate(end)
    return end
