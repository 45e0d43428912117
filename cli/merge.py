"""`surgery merge`: adapters folded into the base weights (or back out), stacked, or averaged; `--stream`: a PEFT LoRA
folder merged into a Hugging Face checkpoint on disk, tensor by tensor, for models past memory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import emit_json, out, step
from cli.options import Json, Output, Trust
from surgery.bundle import save_adapted
from surgery.errors import SurgeryError
from surgery.io import check_output
from surgery.merge_stream import merge_lora_streamed
from surgery.meta import capture_meta
from surgery.peft_import import import_peft, read_peft
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
    typer.Argument(
        help="Adapted .pt2 files written by `surgery insert` (one; several with --stack/--average); with --stream, "
        "a PEFT LoRA folder."
    ),
]
Stack = Annotated[bool, typer.Option("--stack", help="Apply the models' adapters in sequence at each site.")]
Average = Annotated[
    Optional[str],
    typer.Option("--average", help="Weights w1,w2,...: combine adapters of one method and shape (LoRA exactly)."),
]
Unmerge = Annotated[bool, typer.Option("--unmerge", help="A merged LoRA model back to its adapted model.")]
Stream = Annotated[
    bool,
    typer.Option(
        "--stream",
        help="Past memory: a PEFT LoRA folder merged into --base's safetensors on disk, tensor by tensor, written as "
        "a new Hugging Face folder (-o, default BASE.merged).",
    ),
]
Base = Annotated[
    Optional[str], typer.Option("--base", help="With --stream: the Hugging Face folder the LoRA was trained on.")
]


def merge(
    sources: Sources,
    output: Output = None,
    stack: Stack = False,
    average: Average = None,
    unmerge: Unmerge = False,
    stream: Stream = False,
    base: Base = None,
    json: Json = False,
    trust: Trust = False,
) -> None:
    """Merge LoRA and linear adapters into the base weights (zero added latency), or compose adapted models."""
    modes = [m for m, on in (("--stack", stack), ("--average", average is not None), ("--unmerge", unmerge)) if on]
    if len(modes) > 1:
        raise SurgeryError(f"{' and '.join(modes)} exclude each other; choose one")
    if stream:
        if modes or len(sources) != 1:
            raise SurgeryError(
                "--stream merges one PEFT LoRA folder into its base checkpoint; "
                + (f"drop {' and '.join(modes)}" if modes else f"give one folder ({len(sources)} given)")
            )
        return _merge_streamed(sources[0], base, output, json)
    if base is not None:
        raise SurgeryError("--base names the checkpoint of a streamed merge; add --stream (and a PEFT LoRA folder)")
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


def _merge_streamed(source: str, base: str | None, output: str | None, json: bool) -> None:
    """--stream: a PEFT LoRA folder's adapters on a weightless capture of `base`, merged into a copy of its shards."""
    if base is None:
        raise SurgeryError(
            f"--stream merges {source} into the checkpoint it was trained on; name it with --base FOLDER"
        )
    path = Path(output) if output else default_output(base, ".merged")
    if path.exists():
        raise SurgeryError(f"output {path}: exists; name a new folder for the merged checkpoint (-o)")
    if not path.parent.is_dir():
        raise SurgeryError(f"output {path}: folder {path.parent} does not exist; create it or choose another -o")
    if not read_peft(source)[1]:  # a PEFT LoRA folder, checked before the base is captured
        raise SurgeryError(f"{source}: holds no LoRA tensors (lora_A / lora_B); nothing to merge")
    with step(f"capture {base} without its weights"):
        captured = capture_meta(base)
    with step(f"insert the LoRA of {source}"):
        spec, report, _ = import_peft(captured, source)
    with step(f"merge {len(report.sites)} LoRA adapters into a copy of {base}'s shards"):
        result = merge_lora_streamed(captured, path)
    data = {**result.to_json(), "source": source, "base": base, "ranks": sorted(set(spec.ranks.values()))}
    if json:
        emit_json(data)
        return
    out.print(
        f"merged {len(result.merged)} of {result.tensors} tensors (ranks {data['ranks']}); "
        f"{result.bytes / 1e9:.2f} GB copied"
    )
    out.print(f"wrote {path}/")


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
