"""`surgery inspect`: a model's layers and insertion sites, an adapted model's manifest, a pack's tensors, or an
exported ONNX model's inputs, outputs and (routed) adapter_id table."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from cli.common import emit_json, out, step
from cli.options import Task, InputDtype, InputShape, Json, Source, Targets, Trust
from surgery.adapters import LoraSpec, StackSpec
from surgery.bundle import Manifest, Training
from surgery.errors import SurgeryError
from surgery.packs import SUFFIXES, load_pack
from surgery.pipeline import open_model
from surgery.sites import find_sites, head_sites, linear_modules


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
    if source and Path(source).suffix == ".onnx":
        _show_onnx(source, json)
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
    heads = head_sites(captured.gm) if targets is None else []  # left out by default; --targets adds them
    total = sum(p.numel() for p in captured.gm.parameters())
    if json:
        emit_json(
            {
                "source": captured.source.to_json(),
                "signature": captured.signature.to_json(),
                "total_params": total,
                "linear_modules": candidates,
                "sites": [s.to_json() for s in sites],
                "head_sites": [s.to_json() for s in heads],
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
    for s in heads:
        out.print(
            f"left out: {s.path} (width {s.width}), a head outside the Transformer layers; "
            f"name it in --targets to adapt it"
        )
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


def _show_onnx(path: str, json: bool) -> None:
    """An exported ONNX model's inputs and outputs, and a routed export's adapter_id table (from its metadata)."""
    import onnx

    from exporters.swappable import route_names

    if not Path(path).is_file():
        raise SurgeryError(f"{path}: no such file; give an exported .onnx model")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001  protobuf's own error types
        raise SurgeryError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    inits = {i.name for i in model.graph.initializer}

    def tensors(values) -> dict[str, dict]:
        return {
            v.name: {
                "type": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
            if v.name not in inits
        }

    names = route_names({p.key: p.value for p in model.metadata_props})
    info = {
        "onnx": path,
        "inputs": tensors(model.graph.input),
        "outputs": tensors(model.graph.output),
        "adapter_ids": {str(i): n for i, n in enumerate(names)} if names is not None else None,
    }
    if json:
        emit_json(info)
        return
    out.print(f"[bold]ONNX model[/] {path} (opset {max((o.version for o in model.opset_import), default=0)})")
    for kind in ("inputs", "outputs"):
        for n, t in info[kind].items():
            out.print(f"  {kind[:-1]} {n}: {t['type']} {t['shape']}")
    if names is not None:
        table = Table(title="routed: adapter_id per request row; any other id runs the base model")
        for col in ("adapter_id", "adapter"):
            table.add_column(col)
        for i, n in enumerate(names):
            table.add_row(str(i), n)
        out.print(table)
