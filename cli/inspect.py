"""`surgery inspect`: a model's layers and insertion sites, or an adapted model's manifest."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from cli.common import Task, InputDtype, InputShape, Json, Source, Targets, Trust, emit_json, out, step
from surgery.adapters import LoraSpec, StackSpec
from surgery.bundle import Manifest, Training
from surgery.errors import SurgeryError
from surgery.packs import SUFFIXES, load_pack
from surgery.pipeline import open_model
from surgery.sites import find_sites, linear_modules


def inspect(
    source: Source = None,
    targets: Targets = None,
    trust: Trust = False,
    input_shape: InputShape = None,
    input_dtype: InputDtype = "float32",
    task: Task = None,
    json: Json = False,
) -> None:
    """Show the Transformer's layers and the insertion sites found in its graph (or a pack's contents)."""
    if source and Path(source).suffix in SUFFIXES:
        _show_pack(source, json)
        return
    with step(f"load and capture {source or 'minilm'}"):
        captured = open_model(source, trust=trust, input_shapes=input_shape, input_dtype=input_dtype, task=task)
    if captured.manifest is not None:
        _show_manifest(captured.manifest, json)
        return
    candidates = linear_modules(captured.gm)
    try:
        sites = find_sites(captured.gm, captured.source.model_type, targets)
        problem = None
    except SurgeryError as exc:
        if targets is not None:
            raise
        sites, problem = [], str(exc)
    total = sum(p.numel() for p in captured.gm.parameters())
    if json:
        emit_json(
            {
                "source": captured.source.to_json(),
                "signature": captured.signature.to_json(),
                "total_params": total,
                "linear_modules": candidates,
                "sites": [s.to_json() for s in sites],
                "problem": problem,
            }
        )
        return
    src = captured.source
    out.print(
        f"[bold]{src.name}[/]  type={src.model_type or 'unknown'}  parameters={total:,}  sha256={src.sha256[:12]}"
    )
    for spec in captured.signature.inputs:
        axes = ", ".join(f"{i}:{a.name}[{a.min}..{a.max}]" for i, a in spec.axes.items())
        out.print(f"  input {spec.name}: {spec.dtype} {list(spec.shape)}  dynamic {axes or 'none'}")
    table = Table(title=f"{len(sites)} insertion sites in {len({s.layer for s in sites})} layers")
    for col in ("layer", "role", "module", "width", "node"):
        table.add_column(col)
    for s in sites:
        table.add_row(str(s.layer), s.role, s.path, str(s.width), s.node)
    out.print(table)
    if problem:
        out.print(f"[yellow]{problem}[/]")
        out.print(f"linear modules: {', '.join(candidates) or 'none'}")


def _show_manifest(manifest: Manifest, json: bool) -> None:
    if json:
        emit_json(manifest.to_json())
        return
    a, src = manifest.adapter, manifest.source
    if isinstance(a, StackSpec):
        what = "of " + " + ".join(p.method for p in a.parts)
    elif isinstance(a, LoraSpec):
        what = f"r={a.ranks} alpha={a.alpha}"
    else:
        what = f"r={a.r} activation={a.activation}"
    out.print(f"[bold]adapted model[/] (surgery {manifest.version}): {a.method} {what}")
    if manifest.merged is not None:
        merged = manifest.merged
        out.print(f"  merged into the base weights: {merged.merged} adapters ({', '.join(merged.kinds)})")
    out.print(f"  source {src.name} ({src.model_type}), sha256 {src.sha256[:12]}")
    share = 100 * manifest.trainable / manifest.total
    out.print(f"  trainable {manifest.trainable:,} of {manifest.total:,} parameters ({share:.2f}%)")
    if manifest.training is not None:
        _show_training(manifest.training)
    table = Table(title=f"{len(manifest.sites)} adapted sites")
    for col in ("layer", "role", "module", "width"):
        table.add_column(col)
    for s in manifest.sites:
        table.add_row(str(s.layer), s.role, s.path, str(s.width))
    out.print(table)


def _show_training(t: Training) -> None:
    out.print(
        f"  trained ({t.task}): {t.steps} steps, {t.examples:,} examples ({t.epochs:g} epochs), "
        f"{t.trainable:,} parameters trained"
    )
    out.print(f"    data {t.data.name} ({t.data.rows:,} rows, sha256 {t.data.sha256[:12]})")
    if t.eval_data is not None:
        out.print(f"    eval {t.eval_data.name} ({t.eval_data.rows:,} rows, sha256 {t.eval_data.sha256[:12]})")
    out.print("    settings " + ", ".join(f"{k}={v}" for k, v in t.hyperparameters.items()))
    out.print("    metrics " + ", ".join(f"{k} {v:.4g}" for k, v in t.metrics.items()))
    if t.labels:
        out.print(f"    labels {', '.join(t.labels)}")
    if t.truncated:
        out.print(f"    {t.truncated} texts truncated to the model's positions")


def _show_pack(path: str, json: bool) -> None:
    pack = load_pack(path)
    info = pack.describe()
    if json:
        emit_json({"pack": path, **info, "shapes": {n: list(t.shape) for n, t in pack.tensors.items()}})
        return
    out.print(
        f"[bold]adapter pack[/] {path}: {info['tensors']} tensors, {info['parameters']:,} parameters, "
        f"rank {info['rank']}"
    )
    out.print(
        f"  fingerprint {info['fingerprint']}"
        + (f", {info['method']} σ={info['activation']} for {info['base']['name']}" if "method" in info else "")
    )
    table = Table()
    for col in ("tensor", "shape"):
        table.add_column(col)
    for n, t in pack.tensors.items():
        table.add_row(n, str(list(t.shape)))
    out.print(table)
