"""`surgery import-adapters`: an AdapterHub (`adapters`) folder onto its base model, saved as NAME.adapted.pt2."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import emit_json, out, step
from cli.options import Base, Json, Output, Trust
from surgery.adapterhub import import_adapterhub, read_adapterhub
from surgery.adapters import LoraSpec
from surgery.bundle import SUFFIX, save_adapted
from surgery.io import check_output
from surgery.pipeline import default_output, open_model


def import_adapters(
    folder: Annotated[
        str,
        typer.Argument(help="A folder written by adapters' model.save_adapter: adapter_config.json + weights."),
    ],
    base: Base = "minilm",
    output: Output = None,
    json: Json = False,
    trust: Trust = False,
) -> None:
    """Import an AdapterHub bottleneck (Houlsby, Pfeiffer, parallel) or LoRA adapter: the adapted model computes
    what `adapters`' forward does."""
    path = check_output(output or default_output(folder, SUFFIX))
    with step(f"read {folder}"):
        read_adapterhub(folder)  # refuses what it cannot import before the base is captured
    with step(f"load and capture {base}"):
        captured = open_model(base, trust=trust)
    with step(f"insert the adapter of {folder}"):
        spec, report, hub = import_adapterhub(captured, folder)
    with step(f"save {path}"):
        save_adapted(path, captured, spec, report, adapterhub=hub)
    r = spec.ranks if isinstance(spec, LoraSpec) else spec.r
    if json:
        emit_json(
            {
                "output": str(path),
                "method": spec.method,
                "r": r,
                "sites": [s.path for s in report.sites],
                "forms": sorted({s.form or ("beside" if s.input else "after") for s in report.sites}),
                "trainable_params": report.trainable,
                "skipped": list(hub.skipped),
                "adapterhub": {"name": hub.name, "config": hub.config, "how": hub.how},
            }
        )
        return
    out.print(
        f"{hub.name}: {spec.method}, r {r}, {len(report.sites)} sites, {report.trainable:,} parameters ({hub.how})"
    )
    if hub.skipped:
        out.print(f"skipped the prediction head saved beside it: {', '.join(hub.skipped)}")
    out.print(f"wrote {path}")
