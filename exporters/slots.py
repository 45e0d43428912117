"""The swappable format's metadata on the exporter's side: what a swappable ONNX export (`exporters/swappable.py`)
and a refittable engine's sidecar (`exporters/tensorrt.py`) record for their readers (`AdaptedSession`, `surgery
swap`), with the adapter spec typed. The runtime reads the same metadata without torch (`runtime/slots.py`).
Its own module so that the writer can check its output with the reader without an import cycle."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from runtime.slots import SlotsMeta, base_only  # noqa: F401  the runtime reads the metadata and cuts the base out
from surgery.adapters import AdapterSpec, spec_from_json
from surgery.bundle import Manifest
from surgery.errors import SurgeryError
from surgery.packs import fingerprint, packable_spec


@dataclass(frozen=True)
class SwappableMeta:
    """What a swappable export records for its readers (`AdaptedSession`, `surgery swap`), as string metadata:
    ONNX `metadata_props`, and a refittable engine's sidecar. The fingerprint packs must match, each site's
    width by module path, the adapter spec, and for a refittable engine the rank it was built at."""

    fingerprint: int
    widths: dict[str, int]
    adapter: AdapterSpec
    max_rank: int | None = None  # refittable engines only (tensorrt.py)

    FINGERPRINT: ClassVar[str] = SlotsMeta.FINGERPRINT
    SITES: ClassVar[str] = SlotsMeta.SITES  # JSON {site path: width}
    ADAPTER: ClassVar[str] = SlotsMeta.ADAPTER  # JSON of the adapter spec
    MAX_RANK: ClassVar[str] = SlotsMeta.MAX_RANK

    @classmethod
    def of(cls, manifest: Manifest, what: str, max_rank: int | None = None) -> SwappableMeta:
        """The metadata of an export of the adapted model `manifest` describes (bottleneck adapters only)."""
        spec = packable_spec(manifest, what)
        return cls(fingerprint(manifest), manifest.widths, spec, max_rank)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            self.FINGERPRINT: str(self.fingerprint),
            self.SITES: json.dumps(self.widths),
            self.ADAPTER: json.dumps(self.adapter.to_json()),
        }
        if self.max_rank is not None:
            meta[self.MAX_RANK] = str(self.max_rank)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str) -> SwappableMeta:
        """Read back what `to_metadata` wrote (`runtime/slots.py`), the spec as an `AdapterSpec`; a model without
        adapter slots is a SurgeryError for `where`."""
        read = SlotsMeta.from_metadata(meta, where)
        try:
            adapter = spec_from_json(read.adapter)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SurgeryError(
                f"{where}: damaged swappable metadata ({type(exc).__name__}: {exc}); export it again"
            ) from exc
        if not isinstance(adapter, AdapterSpec):
            method = adapter.method
            raise SurgeryError(f"{where}: the slots are for {method} adapters, not bottlenecks; export it again")
        return cls(read.fingerprint, read.widths, adapter, read.max_rank)
