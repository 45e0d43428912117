"""`surgery import-peft`: a PEFT LoRA folder onto its base model, saved as NAME.adapted.pt2."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import emit_json, out, step
from cli.options import Base, Json, Output, Trust
from surgery.bundle import SUFFIX, save_adapted
from surgery.io import check_output
from surgery.peft_import import import_peft as import_folder
from surgery.pipeline import default_output, open_model


def import_peft(
    folder: Annotated[str, typer.Argument(help="A PEFT LoRA folder: adapter_config.json + adapter_model.safetensors.")],
    base: Base = "minilm",
    output: Output = None,
    json: Json = False,
    trust: Trust = False,
) -> None:
    """Import a PEFT LoRA adapter: the adapted model computes what PEFT's forward does."""
    path = check_output(output or default_output(folder, SUFFIX))
    with step(f"load and capture {base}"):
        captured = open_model(base, trust=trust)
    with step(f"insert the LoRA of {folder}"):
        spec, report, peft = import_folder(captured, folder)
    with step(f"save {path}"):
        manifest = save_adapted(path, captured, spec, report, peft=peft)
    if json:
        emit_json(
            {
                "output": str(path),
                "sites": [s.path for s in report.sites],
                "ranks": spec.ranks,
                "trainable_params": report.trainable,
                "peft": manifest.to_json()["peft"],
            }
        )
        return
    out.print(
        f"{len(report.sites)} LoRA sites, {report.trainable:,} parameters, ranks {sorted(set(spec.ranks.values()))}"
    )
    out.print(f"wrote {path}")
