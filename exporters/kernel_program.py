"""A torch.export program for torch on CUDA whose bottleneck adapters are one `surgery::bottleneck` op each.

On an NVIDIA GPU each op is one Triton kernel (surgery/kernels.py) instead of three launches; replayed in a CUDA graph
this cuts a bottleneck's overhead by about half (figures: docs/benchmarks.md). Run it eagerly and the kernel's Python
launch costs more than it saves: capture it in a CUDA graph (`torch.cuda.graphs`) or use the plain program. Load it
after `import surgery.kernels`, which registers the op. Written only if the saved program, reloaded, matches the unfused
model in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporters.verify import check_program
from surgery import pt2_save
from surgery.capture import Captured, export_program
from surgery.errors import SurgeryError
from surgery.fuse import KernelBottleneck, fused_copy
from surgery.io import atomic_output
from surgery.parity import ATOL, RTOL, Parity
from surgery.safe_files import check_pt2


@dataclass(frozen=True)
class KernelProgram:
    path: Path
    kernels: int  # bottlenecks now one op each
    parity: Parity  # the reloaded program against the unfused adapted model

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "kernels": self.kernels, **self.parity.to_json()}


def export_kernel_program(
    captured: Captured, path: str | Path, tolerance: float = ATOL, rtol: float = RTOL
) -> KernelProgram:
    import surgery.kernels  # noqa: F401  the op must exist to reload the program

    gm = fused_copy(captured.gm, captured.manifest, kernel=True)
    if gm is None:
        raise SurgeryError(
            f"{captured.source.name}: no bottleneck adapter after a biased projection to fuse; "
            "--fused-pt2 takes a houlsby or pfeiffer model from `surgery insert`"
        )
    kernels = sum(isinstance(m, KernelBottleneck) for m in gm.modules())
    program = export_program(gm, captured.signature, str(path))
    with atomic_output(path) as tmp:
        pt2_save.save(program, tmp)
        check_pt2(tmp, str(path))  # what this tool writes must open without --trust
        parity = check_program(torch.export.load(tmp).module(), captured.gm, captured.signature, tolerance, rtol)
        if not parity.ok:
            raise SurgeryError(
                f"{path}: the fused program differs from the adapted model by more than --atol + --rtol x "
                f"max|torch| allow: {parity.summary()}; nothing written"
            )
    return KernelProgram(Path(path), kernels, parity)
