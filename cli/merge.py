"""`surgery merge`: adapters folded into the base weights (or back out), stacked, or averaged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Json, Output, Trust, emit_json, out, step
from surgery.bundle import save_adapted
from surgery.errors import SurgeryError
from surgery.io import check_output
from surgery.pipeline import (
    PACK,
    adapted_report,
    combine_models,
    default_output,
    merge_model,
    open_adapted,
    pack_loras,
    unmerge_model,
)

Sources = Annotated[
    list[str],
    typer.Argument(help="Adapted .pt2 files written by `surgery insert` (one; several with --stack/--average)."),
]
Stack = Annotated[bool, typer.Option("--stack", help="Apply the models' adapters in sequence at each site.")]
Average = Annotated[
    Optional[str],
    typer.Option("--average", help="Weights w1,w2,...: combine adapters of one method and shape (LoRA exactly)."),
]
Unmerge = Annotated[bool, typer.Option("--unmerge", help="A merged LoRA model back to its adapted model.")]


def merge(
    sources: Sources,
    output: Output = None,
    stack: Stack = False,
    average: Average = None,
    unmerge: Unmerge = False,
    json: Json = False,
    trust: Trust = False,
) -> None:
    """Merge LoRA and linear adapters into the base weights (zero added latency), or compose adapted models."""
    modes = [m for m, on in (("--stack", stack), ("--average", average is not None), ("--unmerge", unmerge)) if on]
    if len(modes) > 1:
        raise SurgeryError(f"{' and '.join(modes)} exclude each other; choose one")
    several = stack or average is not None
    if several and len(sources) < 2:
        raise SurgeryError(f"{modes[0]} combines several adapted models; give two or more .pt2 files")
    if not several and len(sources) != 1:
        raise SurgeryError(
            f"merge takes one adapted model ({len(sources)} given); to combine several use --stack or --average"
        )
    weights = _weights(average, len(sources)) if average is not None else None
    suffix = ".stacked.pt2" if stack else ".averaged.pt2" if weights else ".unmerged.pt2" if unmerge else ".merged.pt2"
    path = check_output(output or default_output(sources[0], suffix))
    if unmerge:
        _unmerge(sources[0], path, json, trust)
    elif several:
        _combine(sources, path, weights, json, trust)
    else:
        _merge(sources[0], path, json, trust)


def _weights(text: str, n: int) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise SurgeryError(
            f"--average {text}: weights must be numbers separated by commas, e.g. --average 0.7,0.3"
        ) from exc
    if len(weights) != n:
        raise SurgeryError(f"--average {text}: {len(weights)} weights for {n} models; give one weight per model")
    return weights


def _merge(source: str, path: Path, json: bool, trust: bool) -> None:
    with step(f"load {source} and lift its adapters"):
        captured, spec, sites = open_adapted(source, trust)
    with step("merge the adapters into the base weights"):
        result, loras = merge_model(captured, sites)
    report = adapted_report(captured.gm, sites)
    with step(f"save {path}"):
        files = {PACK: pack_loras(loras)} if loras else None
        save_adapted(path, captured, spec, report, merged=result.manifest, files=files)
    data = {"output": str(path), **result.to_json()}
    if json:
        emit_json(data)
        return
    out.print(f"merged {data['merged']} adapters ({', '.join(data['kinds'])}); the graph has {data['nodes']} nodes")
    out.print(f"max |merged - adapted| = {result.output_max_abs_diff:.2e} on a padded 3×24 batch")
    if result.unmerge_max_abs_diff is not None:
        out.print(f"max |unmerge(merge(W)) - W| = {result.unmerge_max_abs_diff:.2e}")
    out.print(f"wrote {path}")


def _unmerge(source: str, path: Path, json: bool, trust: bool) -> None:
    with step(f"load {source} and take its LoRA out of the weights"):
        captured, spec, sites, diff = unmerge_model(source, trust)
    report = adapted_report(captured.gm, sites)
    with step(f"save {path}"):
        save_adapted(path, captured, spec, report)
    if json:
        emit_json(
            {
                "output": str(path),
                "sites": len(sites),
                "trainable_params": report.trainable,
                "unmerge_max_abs_diff": diff,
            }
        )
        return
    out.print(
        f"{len(sites)} LoRA adapters back beside their projections; max |unmerge(merge(W)) - W| = {diff:.2e} (at merge)"
    )
    out.print(f"wrote {path}")


def _combine(sources: list[str], path: Path, weights: list[float] | None, json: bool, trust: bool) -> None:
    how = "stack" if weights is None else f"average with weights {weights}"
    with step(f"load {len(sources)} models, lift their adapters, {how}"):
        combined = combine_models(sources, weights, trust)
    report = adapted_report(combined.captured.gm, combined.sites)
    with step(f"save {path}"):
        manifest = save_adapted(
            path, combined.captured, combined.spec, report, stack=combined.stack, average=combined.average
        )
    extra = {k: v for k, v in manifest.to_json().items() if k in ("stack", "average")}
    data = {
        "output": str(path),
        "adapter": combined.spec.to_json(),
        "sites": len(combined.sites),
        "trainable_params": report.trainable,
        **extra,
    }
    if json:
        emit_json(data)
        return
    out.print(f"{how}: {len(combined.sites)} adapters, {report.trainable:,} parameters")
    if combined.average is not None:
        out.print(f"how: {combined.average.how}")
    out.print(f"wrote {path}")
