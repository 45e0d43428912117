"""The steps every command shares: load and capture a source, find its sites, insert adapters."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from surgery.adapters import AdapterSpec, LoraSpec, stand_in_weights
from surgery.bundle import save_adapted
from surgery.capture import Captured, capture
from surgery.errors import SurgeryError
from surgery.insert import InsertReport, insert_adapters, sites_for
from surgery.load import DEFAULT_MODEL, load


def open_model(
    source: str | None, *, trust: bool = False, input_shapes: list[str] | None = None, input_dtype: str = "float32"
) -> Captured:
    """Load `source` and capture it as a GraphModule."""
    return capture(load(source, trust=trust, input_shapes=input_shapes, input_dtype=input_dtype))


def adapt(captured: Captured, spec: AdapterSpec | LoraSpec, seed: int = 0) -> InsertReport:
    """Insert `spec`'s adapters into a captured base model (in place). Refuses an already adapted one."""
    if captured.manifest is not None:
        a = captured.manifest["adapter"]
        raise SurgeryError(
            f"{captured.source.name} is already adapted ({a['method']}, r={a['r']}); "
            f"insert into its base model instead: {captured.manifest['source']['name']}"
        )
    sites = sites_for(captured.gm, captured.source.model_type, spec)
    torch.manual_seed(seed)  # the down-projections' random init repeats run to run
    return insert_adapters(captured.gm, sites, spec)


def stand_in_adapted(
    base: Captured, spec: AdapterSpec | LoraSpec, path: str | Path, seed: int = 0, weights_seed: int | None = None
) -> Captured:
    """An adapted copy of `base` with stand-in adapter weights (`stand_in_weights`, seeded `weights_seed`,
    default `seed`), saved to `path` as an .adapted.pt2 and reopened, as a trained model would arrive."""
    captured = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    report = adapt(captured, spec, seed=seed)
    stand_in_weights(captured.gm, seed=seed if weights_seed is None else weights_seed)
    save_adapted(path, captured, spec, report)
    return open_model(str(path))


def default_output(source: str | None, suffix: str) -> Path:
    """In the working folder: minilm -> minilm{suffix}, a/model.adapted.pt2 -> model.adapted{suffix},
    a/folder -> folder{suffix}, a/folder/config.json -> folder{suffix}."""
    path = Path(source or DEFAULT_MODEL)
    if path.name == "config.json":
        stem = path.resolve().parent.name
    elif path.is_file():
        stem = path.stem
    else:
        stem = path.resolve().name if path.is_dir() else path.name
    return Path(f"{stem}{suffix}")
