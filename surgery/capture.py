"""Capture: `torch.export` with dynamic batch and sequence, then `.module()`: a torch.fx GraphModule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from surgery.errors import SurgeryError
from surgery.signature import Signature
from surgery.source import Source

if TYPE_CHECKING:
    from runtime.speech import Decoding
    from surgery.bundle import Manifest
    from surgery.load import Loaded


@dataclass
class Captured:
    """A model as a GraphModule, with the inputs it takes and where it came from."""

    gm: fx.GraphModule
    signature: Signature
    source: Source
    manifest: Manifest | None = None  # the manifest of an adapted .pt2, if that was the source
    task: str = "feature-extraction"  # the head captured (tasks.py)
    decoding: Decoding | None = None  # a speech recognizer's start and stop tokens (runtime/speech.py)


def export_program(module: nn.Module, signature: Signature, what: str) -> torch.export.ExportedProgram:
    """`torch.export.export(strict=False)` over the signature's example inputs and dynamic axes."""
    args, kwargs = signature.export_args(signature.examples())
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=signature.dynamic_shapes(), strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(
            f"{what}: torch.export could not capture the model ({type(exc).__name__}: {first}); "
            "check --input-shape, or export it yourself and pass the .pt2"
        ) from exc


def capture(loaded: Loaded) -> Captured:
    """The loaded model as a GraphModule whose nodes carry `nn_module_stack` (see sites.py)."""
    if loaded.program is not None:
        program = loaded.program
    else:
        assert loaded.module is not None
        program = export_program(loaded.module, loaded.signature, loaded.source.name)
    gm = program.module()
    return Captured(
        gm=gm,
        signature=loaded.signature,
        source=loaded.source,
        manifest=loaded.manifest,
        task=loaded.task,
        decoding=loaded.decoding,
    )
