"""`AdaptedSession`: one ONNX Runtime session of a swappable export, many adapter packs, chosen per run.

    session = AdaptedSession("minilm.swappable.onnx")
    session.load("task_a", "task_a.onnx_adapter")
    session.load("task_b", "task_b.safetensors")
    session.run(inputs, adapter="task_a")   # None: the base model

Packs are checked against the export (fingerprint, tensor names, shapes) before ONNX Runtime sees them.
Each is memory-mapped by `onnxruntime.LoraAdapter` and activated through its own `RunOptions`, so a swap
is the choice of a RunOptions object: no new session, no copy of the base weights. A `.safetensors`
pack is converted once, at load, into ORT's format in a temporary folder that lives with the session.

With no pack active, the slots add zero but ONNX Runtime would still run them (empty GEMMs, full-size adds): a
run without an adapter takes a second session of the base graph cut out of the export (`slots.base_only`), built
on first use. It holds its own copy of the base weights; `base_path=False` keeps one session for everything (and
a model with external data always does).
"""

from __future__ import annotations

import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SurgeryError
from .files import check_name, check_onnx_data
from .packs import (
    ORT_TYPES,
    Pack,
    active_adapter,
    as_numpy,
    check_pack,
    dtype_name,
    load_pack,
    ortvalue,
    write_onnx_adapter,
)
from .session import CPU, has_bf16, ort_session
from .slots import SlotsMeta, base_only


class AdaptedSession:
    """A swappable ONNX model and the adapter packs loaded into it."""

    def __init__(
        self,
        path: str | Path,
        threads: int = 2,
        spinning: bool = True,
        providers: tuple[str, ...] = CPU,
        base_path: bool = True,
    ):
        self.path = Path(path)
        check_onnx_data(self.path)  # before ONNX Runtime opens it: external data stays beside the model
        self._settings = dict(threads=threads, spinning=spinning, providers=providers)
        self._base_path = base_path
        self.session = ort_session(self.path, **self._settings)
        slots = SlotsMeta.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.fingerprint = slots.fingerprint
        self.widths: dict[str, int] = slots.widths
        self.spec: dict[str, Any] = slots.adapter  # the adapter spec's JSON: method, r, activation
        self.inputs = [i.name for i in self.session.get_inputs() if not i.name.startswith("adapters.")]
        slots_in = self.session.get_overridable_initializers()  # ORT lists the slots here, not among the inputs
        slot_types = {i.type for i in slots_in if i.name.startswith("adapters.")}
        self.dtype = ORT_TYPES.get(next(iter(slot_types), ""), "float32")  # what the adapter slots take
        self._options: dict[str, Any] = {}
        self._keep: list[Any] = []  # LoraAdapter objects must outlive the RunOptions that name them
        self._tensors: dict[str, dict[str, np.ndarray]] = {}  # each pack in the session's dtype, for IO binding
        self._values: dict[tuple[str, str, int], dict[str, Any]] = {}  # and as OrtValues, per device
        self._tmp = tempfile.TemporaryDirectory(prefix="surgery-packs-")

    @cached_property
    def base_session(self) -> Any:
        """The session that runs the model with no pack: the base graph alone where it can be cut out of the
        export (see the module's docstring), else the swappable session itself."""
        import onnx

        if not self._base_path:
            return self.session
        model = onnx.load(str(self.path), load_external_data=False)
        if has_bf16(self.path) or any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            return self.session  # a bf16 model runs as its fp32 copy, and external data stays where it is
        base = base_only(model, self.widths)
        return self.session if base is None else ort_session(base.SerializeToString(), **self._settings)

    @property
    def adapters(self) -> list[str]:
        return list(self._options)

    def load(self, name: str, pack: str | Path | Pack) -> Pack:
        """Check a pack against this export and make it available as `name`."""
        check_name(name, "pack name")
        label = f"pack {name!r}" + (f" ({pack})" if not isinstance(pack, Pack) else "")
        loaded = pack if isinstance(pack, Pack) else load_pack(pack)
        check_pack(loaded, self.fingerprint, self.widths, name=label)
        dtypes = {dtype_name(t) for t in loaded.tensors.values()}
        tensors = {n: as_numpy(t, self.dtype) for n, t in loaded.tensors.items()}
        if isinstance(pack, (str, Path)) and Path(pack).suffix == ".onnx_adapter" and dtypes == {self.dtype}:
            file = Path(pack)
        else:  # in the session's dtype: a bf16 model runs as fp32 on the CPU (runtime/session.py)
            file = write_onnx_adapter(
                tensors, loaded.fingerprint, Path(self._tmp.name) / f"{len(self._keep)}.onnx_adapter"
            )
        adapter, options = active_adapter(file)
        self._keep.append(adapter)
        self._options[name] = options
        self._tensors[name] = tensors
        self._values = {k: v for k, v in self._values.items() if k[0] != name}  # a name loaded again
        return loaded

    def run_options(self, adapter: str | None) -> Any:
        """The RunOptions that activate `adapter` (None: the base model). Valid while this object lives:
        it owns the memory-mapped pack that the options point to."""
        if adapter is None:
            return None
        if adapter not in self._options:
            raise SurgeryError(f"no adapter named {adapter!r} is loaded (loaded: {', '.join(self._options) or 'none'})")
        return self._options[adapter]

    def adapter_values(self, adapter: str, device: tuple[str, int] = ("cpu", 0)) -> dict[str, Any]:
        """The pack `adapter` as OrtValues on `device` (made once, then kept there), by slot name: the inputs to
        bind for a run through IO binding. ONNX Runtime (1.32) applies the adapters a RunOptions activates in
        `session.run` only; `run_with_iobinding` ignores them and would run the base model."""
        self.run_options(adapter)  # an unknown name: the same one-line error
        key = (adapter, *device)
        if key not in self._values:
            self._values[key] = {n: ortvalue(t, device) for n, t in self._tensors[adapter].items()}
        return self._values[key]

    def run(self, inputs: dict[str, np.ndarray], adapter: str | None = None) -> list[np.ndarray]:
        """Run with `adapter` active (None: the base model); inputs by name, outputs in graph order."""
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise SurgeryError(f"missing input {missing[0]!r}; this model takes {', '.join(self.inputs)}")
        feeds = {n: inputs[n] for n in self.inputs}
        if adapter is None:
            return self.base_session.run(None, feeds)
        return self.session.run(None, feeds, self.run_options(adapter))
