"""A `.pt2` opened without its base weights: the program deserialized with fake parameters (as surgery/meta.py
captures a folder), and the archive's weight records read one tensor at a time, for the streamed export
(exporters/stream.py) and its block-wise check (exporters/blockwise.py).

`torch.export.save` stores each weight as a raw, uncompressed zip member (`data/weights/weight_N`) described by
`data/weights/model_weights_config.json` (dtype, sizes, strides, storage offset). So a tensor is a plain read at its
member's data offset: nothing is mapped, and the pages go once the tensor does. Adapters (under `adapters.`), buffers
and constants are read for real: they are small. What torch reads here is what `torch.export.load` reads, through the
same deserializer, after the same `check_pt2`.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import SurgeryError
from surgery.meta import MetaCaptured
from surgery.sites import ADAPTER_ROOT
from surgery.source import Source

MODEL = "model"  # the program's name inside the archive (torch.export.save writes one)
LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip member's local header: signature, ..., name and extra lengths


@dataclass(frozen=True)
class Record:
    """Where one state-dict tensor's bytes lie in the archive, and how to view them."""

    offset: int  # of the member's data in the file
    length: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


@dataclass(frozen=True)
class ArchiveWeights:
    """A `.pt2`'s weights as `surgery.meta.Checkpoint` offers a folder's: `read` them tensor by tensor."""

    path: Path
    records: dict[str, Record]  # state-dict name -> its record

    def bytes(self) -> int:
        return sum(r.length for r in {(r.offset, r.length): r for r in self.records.values()}.values())

    def read(self, keys: dict[str, torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each of `keys` in its dtype, one at a time, in file order, with plain reads (not mapped)."""
        with open(self.path, "rb") as f:
            for k in sorted(keys, key=lambda k: self.records[k].offset):
                r = self.records[k]
                f.seek(r.offset)
                raw = bytearray(r.length)
                if f.readinto(raw) != r.length:
                    raise SurgeryError(f"{self.path}: the record of {k} is cut short; the archive is damaged")
                flat = torch.frombuffer(raw, dtype=r.dtype) if raw else torch.empty(0, dtype=r.dtype)
                yield k, torch.as_strided(flat, r.size, r.stride, r.storage_offset).to(keys[k]).contiguous()


def _data_offsets(path: Path, name: str) -> dict[str, tuple[int, int]]:
    """{record (the member's name without the archive's folder): (data offset, length)} of the stored members."""
    offsets = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            record = info.filename.split("/", 1)[-1]
            if not record.startswith("data/weights/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise SurgeryError(
                    f"{name}: member {info.filename} is compressed; torch.export.save stores weights raw: "
                    "re-save the model with torch.export.save, or export without --stream"
                )
            f.seek(info.header_offset)
            magic, n, extra = LOCAL_HEADER.unpack(f.read(LOCAL_HEADER.size))
            if magic != b"PK\x03\x04":
                raise SurgeryError(f"{name}: member {info.filename} has no local header; the archive is damaged")
            offsets[record] = (info.header_offset + LOCAL_HEADER.size + n + extra, info.file_size)
    return offsets


def capture_pt2_meta(source: str, trust: bool = False) -> MetaCaptured:
    """A `.pt2` (an `.adapted.pt2` or any torch.export archive) as a weightless capture: its program with fake base
    parameters, `checkpoint` reading the real ones from the archive. Adapters, buffers and constants are real."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import (
        ExportedProgramDeserializer,
        _bytes_to_dataclass,
        deserialize_scalar_type,
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
    )
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export.pt2_archive import _package as package
    from torch.export.pt2_archive.constants import (
        MODELS_FILENAME_FORMAT,
        SAMPLE_INPUTS_FILENAME_FORMAT,
        WEIGHTS_CONFIG_FILENAME_FORMAT,
        WEIGHTS_DIR,
    )

    import surgery.kernels  # noqa: F401  registers surgery::bottleneck, as load does
    from surgery.bundle import MANIFEST, read_manifest
    from surgery.load import program_signature, sha256_of
    from surgery.parity import weights_dtype
    from surgery.safe_files import check_pt2
    from surgery.tasks import FEATURE_EXTRACTION

    path = Path(source)
    check_pt2(path, source, trust)  # before the deserializer: it evaluates what the archive holds
    offsets = _data_offsets(path, source)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    records: dict[str, Record] = {}
    state: dict[str, torch.Tensor] = {}
    real: dict[str, torch.dtype] = {}
    try:
        with package.PT2ArchiveReader(str(path)) as reader:
            config = package._load_payload_config(reader, WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL))
            for fqn, entry in config.config.items():
                meta = entry.tensor_meta
                if entry.use_pickle or meta is None:
                    raise SurgeryError(
                        f"{source}: the weight {fqn} is pickled, not a raw record; --stream reads raw records: "
                        "re-save the model with torch.export.save, or export without --stream"
                    )
                dtype = deserialize_scalar_type(meta.dtype)
                offset, length = offsets[WEIGHTS_DIR + entry.path_name]
                size, stride = tuple(deserialize_size(meta.sizes)), tuple(deserialize_stride(meta.strides))
                start = deserialize_storage_offset(meta.storage_offset)
                records[fqn] = Record(offset, length, dtype, size, stride, start)
                if entry.is_param and not fqn.startswith(ADAPTER_ROOT + "."):
                    with mode:
                        state[fqn] = torch.nn.Parameter(
                            torch.empty_strided(size, stride, dtype=dtype), requires_grad=False
                        )
                else:
                    real[fqn] = dtype
            weights = ArchiveWeights(path, records)
            for fqn, t in weights.read(real):
                entry = config.config[fqn]
                assert entry.tensor_meta is not None
                grad = entry.tensor_meta.requires_grad
                state[fqn] = torch.nn.Parameter(t, requires_grad=grad) if entry.is_param else t
            constants = package._load_constants(reader, MODEL)
            graph = reader.read_bytes(MODELS_FILENAME_FORMAT.format(MODEL))
            serialized = _bytes_to_dataclass(schema.ExportedProgram, graph)
            samples = reader.read_bytes(SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL))
            program = ExportedProgramDeserializer(None).deserialize(serialized, state, constants, samples)
            member = f"extra/{MANIFEST}"
            extra = {MANIFEST: reader.read_string(member)} if member in reader.get_file_names() else {}
    except SurgeryError:
        raise
    except Exception as exc:  # torch raises many types for a damaged or foreign archive
        raise SurgeryError(
            f"{source}: not a torch.export archive --stream can read ({type(exc).__name__}: {exc}); "
            "re-save it with torch.export.save, or export without --stream"
        ) from exc
    manifest = read_manifest(extra, source)
    gm = program.module()
    base = {n for n, t in state.items() if isinstance(t, torch.nn.Parameter) and not n.startswith(ADAPTER_ROOT + ".")}
    keys = {n: n for n, _ in gm.named_parameters(remove_duplicate=False) if n in base}
    return MetaCaptured(
        gm=gm,
        signature=manifest.signature if manifest is not None else program_signature(program),
        source=Source(source, str(path), sha256_of(path), manifest.source.model_type if manifest else None),
        manifest=manifest,
        task=manifest.task if manifest is not None else FEATURE_EXTRACTION,
        checkpoint=weights,  # type: ignore[arg-type]  read as a Checkpoint is
        keys=keys,
        dtype=weights_dtype(gm),
    )
