"""`AdaptedSession`: one ONNX Runtime session of a swappable export, many adapter packs, chosen per run.

    session = AdaptedSession("minilm.swappable.onnx")
    session.load("task_a", "task_a.onnx_adapter")
    session.load("task_b", "task_b.safetensors")
    session.run(inputs, adapter="task_a")   # None: the base model

Packs are checked against the export (fingerprint, tensor names, shapes) before ONNX Runtime sees them.
Each is memory-mapped by `onnxruntime.LoraAdapter` and activated through its own `RunOptions`, so a swap
is the choice of a RunOptions object: no new session, no copy of the base weights. A `.safetensors`
pack is converted once, at load, into ORT's format in a temporary folder that lives with the session.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.slots import SwappableMeta
from exporters.verify import CPU, ort_session
from surgery.adapters import AdapterSpec
from surgery.errors import SurgeryError
from surgery.packs import Pack, check_pack, load_pack, save_pack
from surgery.safe_files import check_name, check_onnx_data


ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}


class AdaptedSession:
    """A swappable ONNX model and the adapter packs loaded into it."""

    def __init__(self, path: str | Path, threads: int = 2, spinning: bool = True, providers: tuple[str, ...] = CPU):
        self.path = Path(path)
        check_onnx_data(self.path)  # before ONNX Runtime opens it: external data stays beside the model
        self.session = ort_session(self.path, threads=threads, spinning=spinning, providers=providers)
        slots = SwappableMeta.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.fingerprint = slots.fingerprint
        self.widths: dict[str, int] = slots.widths
        self.spec: AdapterSpec = slots.adapter
        self.inputs = [i.name for i in self.session.get_inputs() if not i.name.startswith("adapters.")]
        slots_in = self.session.get_overridable_initializers()  # ORT lists the slots here, not among the inputs
        slot_types = {i.type for i in slots_in if i.name.startswith("adapters.")}
        self.dtype = ORT_TYPES.get(next(iter(slot_types), ""), torch.float32)  # what the adapter slots take
        self._options: dict[str, Any] = {}
        self._keep: list[Any] = []  # LoraAdapter objects must outlive the RunOptions that name them
        self._tmp = tempfile.TemporaryDirectory(prefix="surgery-packs-")

    @property
    def adapters(self) -> list[str]:
        return list(self._options)

    def load(self, name: str, pack: str | Path | Pack) -> Pack:
        """Check a pack against this export and make it available as `name`."""
        import onnxruntime as ort

        check_name(name, "pack name")
        label = f"pack {name!r}" + (f" ({pack})" if not isinstance(pack, Pack) else "")
        loaded = pack if isinstance(pack, Pack) else load_pack(pack)
        check_pack(loaded, self.fingerprint, self.widths, name=label)
        dtypes = {t.dtype for t in loaded.tensors.values()}
        if isinstance(pack, (str, Path)) and Path(pack).suffix == ".onnx_adapter" and dtypes == {self.dtype}:
            file = Path(pack)
        else:  # in the session's dtype: a bf16 model runs as fp32 on the CPU (exporters/verify.py)
            cast = Pack({n: t.to(self.dtype) for n, t in loaded.tensors.items()}, loaded.fingerprint, loaded.meta)
            file = save_pack(cast, Path(self._tmp.name) / f"{len(self._keep)}.onnx_adapter")
        adapter = ort.LoraAdapter()
        adapter.Load(str(file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        self._keep.append(adapter)
        self._options[name] = options
        return loaded

    def run_options(self, adapter: str | None) -> Any:
        """The RunOptions that activate `adapter` (None: the base model). Valid while this object lives:
        it owns the memory-mapped pack that the options point to."""
        if adapter is None:
            return None
        if adapter not in self._options:
            raise SurgeryError(f"no adapter named {adapter!r} is loaded (loaded: {', '.join(self._options) or 'none'})")
        return self._options[adapter]

    def run(self, inputs: dict[str, np.ndarray], adapter: str | None = None) -> list[np.ndarray]:
        """Run with `adapter` active (None: the base model); inputs by name, outputs in graph order."""
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise SurgeryError(f"missing input {missing[0]!r}; this model takes {', '.join(self.inputs)}")
        feeds = {n: inputs[n] for n in self.inputs}
        return self.session.run(None, feeds, self.run_options(adapter))
