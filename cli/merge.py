"""`surgery merge`: adapters folded into the base weights (or back out), stacked, or averaged."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import Json, Output, emit_json, out, step
from surgery.adapters import LoraSpec
from surgery.bundle import save_adapted
from surgery.errors import SurgeryError
from surgery.insert import InsertReport
from surgery.io import check_output
from surgery.merge import (
    PACK,
    StackSpec,
    average_adapters,
    check_same_base,
    merge_model,
    open_adapted,
    pack_loras,
    stack_adapters,
    unmerge_model,
)
from surgery.pipeline import default_output
from surgery.sites import ADAPTER_ROOT


def merge(
    sources: Annotated[list[str], typer.Argument(help="Adapted .pt2 files written by `surgery insert` (one, or several with --stack/--average).")],
    output: Output = None,
    stack: Annotated[bool, typer.Option("--stack", help="Apply the models' adapters in sequence at each site.")] = False,
    average: Annotated[
        Optional[str], typer.Option("--average", help="Weights w1,w2,...: combine adapters of one method and shape (LoRA exactly).")
    ] = None,
    unmerge: Annotated[bool, typer.Option("--unmerge", help="A merged LoRA model back to its adapted model.")] = False,
    json: Json = False,
) -> None:
    """Merge LoRA and linear adapters into the base weights (zero added latency), or compose adapted models."""
    modes = [m for m, on in (("--stack", stack), ("--average", average is not None), ("--unmerge", unmerge)) if on]
    if len(modes) > 1:
        raise SurgeryError(f"{' and '.join(modes)} exclude each other; choose one")
    several = stack or average is not None
    if several and len(sources) < 2:
        raise SurgeryError(f"{modes[0]} combines several adapted models; give two or more .pt2 files")
    if not several and len(sources) != 1:
        raise SurgeryError(f"merge takes one adapted model ({len(sources)} given); to combine several use --stack or --average")
    weights = _weights(average, len(sources)) if average is not None else None
    suffix = ".stacked.pt2" if stack else ".averaged.pt2" if average is not None else ".unmerged.pt2" if unmerge else ".merged.pt2"
    path = check_output(output or default_output(sources[0], suffix))
    if unmerge:
        _unmerge(sources[0], path, json)
    elif several:
        _combine(sources, path, weights, json)
    else:
        _merge(sources[0], path, json)


def _weights(text: str, n: int) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise SurgeryError(f"--average {text}: weights must be numbers separated by commas, e.g. --average 0.7,0.3") from exc
    if len(weights) != n:
        raise SurgeryError(f"--average {text}: {len(weights)} weights for {n} models; give one weight per model")
    return weights


def _merge(source: str, path, json: bool) -> None:
    with step(f"load {source} and lift its adapters"):
        captured, spec, sites = open_adapted(source)
    with step("merge the adapters into the base weights"):
        result, loras = merge_model(captured, sites)
    total = sum(p.numel() for p in captured.gm.parameters())
    extra = {"merged": result.to_json()}
    with step(f"save {path}"):
        save_adapted(path, captured, spec, InsertReport(sites, 0, total), extra=extra, files={PACK: pack_loras(loras)} if loras else None)
    data = {"output": str(path), **result.to_json()}
    if json:
        emit_json(data)
        return
    out.print(f"merged {data['merged']} adapters ({', '.join(data['kinds'])}); the graph has {data['nodes']} nodes")
    out.print(f"max |merged - adapted| = {result.output_max_abs_diff:.2e} on a padded 3×24 batch")
    if result.unmerge_max_abs_diff is not None:
        out.print(f"max |unmerge(merge(W)) - W| = {result.unmerge_max_abs_diff:.2e}")
    out.print(f"wrote {path}")


def _unmerge(source: str, path, json: bool) -> None:
    with step(f"load {source} and take its LoRA out of the weights"):
        captured, spec, sites, diff = unmerge_model(source)
    params = list(captured.gm.named_parameters())
    report = InsertReport(sites, sum(p.numel() for n, p in params if n.startswith(ADAPTER_ROOT + ".")), sum(p.numel() for _, p in params))
    with step(f"save {path}"):
        save_adapted(path, captured, spec, report)
    if json:
        emit_json({"output": str(path), "sites": len(sites), "trainable_params": report.trainable, "unmerge_max_abs_diff": diff})
        return
    out.print(f"{len(sites)} LoRA adapters back beside their projections; max |unmerge(merge(W)) - W| = {diff:.2e} (measured at merge)")
    out.print(f"wrote {path}")


def _combine(sources: list[str], path, weights: list[float] | None, json: bool) -> None:
    opened = []
    for source in sources:
        with step(f"load {source} and lift its adapters"):
            opened.append(open_adapted(source))
    check_same_base([c.manifest for c, _, _ in opened], sources)
    first, spec, sites = opened[0]
    if weights is None:
        with step(f"stack {len(sources)} models' adapters"):
            all_sites = list(sites)
            for k, (other, _, other_sites) in enumerate(opened[1:], 1):
                all_sites += stack_adapters(first.gm, other.gm, other_sites, prefix=f"{ADAPTER_ROOT}.{k}")
        spec_out = StackSpec([s.to_json() for _, s, _ in opened])
        extra = {"stack": [{"prefix": ADAPTER_ROOT if k == 0 else f"{ADAPTER_ROOT}.{k}", "source": c.manifest["source"]["name"], "sites": len(s)}
                           for k, (c, _, s) in enumerate(opened)]}
    else:
        methods = {s.method for _, s, _ in opened}
        if len(methods) > 1:
            raise SurgeryError(f"--average: the models use different methods ({', '.join(sorted(methods))}); average adapters of one method only")
        with step(f"average {len(sources)} models' adapters with weights {weights}"):
            average_adapters(first.gm, [c.gm for c, _, _ in opened[1:]], weights)
        all_sites = sites
        spec_out = LoraSpec({r: n * len(sources) for r, n in spec.ranks.items()}) if isinstance(spec, LoraSpec) else spec
        how = "weighted sum of the deltas A·B, one LoRA of the summed rank (exact)" if isinstance(spec, LoraSpec) else "weighted average of the parameters"
        extra = {"average": {"sources": [c.manifest["source"]["name"] for c, _, _ in opened], "weights": weights, "how": how}}
    params = list(first.gm.named_parameters())
    report = InsertReport(all_sites, sum(p.numel() for n, p in params if n.startswith(ADAPTER_ROOT + ".")), sum(p.numel() for _, p in params))
    with step(f"save {path}"):
        save_adapted(path, first, spec_out, report, extra=extra)
    data = {"output": str(path), "adapter": spec_out.to_json(), "sites": len(all_sites), "trainable_params": report.trainable, **extra}
    if json:
        emit_json(data)
        return
    out.print(f"{'stacked' if weights is None else 'averaged'} {len(sources)} models: {len(all_sites)} adapters, {report.trainable:,} parameters")
    if weights is not None:
        out.print(f"how: {extra['average']['how']}")
    out.print(f"wrote {path}")
