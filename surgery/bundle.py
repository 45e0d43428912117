"""Adapted models on disk: `NAME.adapted.pt2`, a `torch.export.save` archive with a manifest inside.

`torch.export.load(path).module()` runs (and trains) the model with no help from this tool; the manifest
(`surgery.json`, an extra file of the archive) says what was done to which source. `Manifest` is that
file's type: every stage after the insert pass reads it as attributes, never by string key. Its JSON is
the one earlier versions wrote (a stack's `adapter` then also carried `r`, `activation` and `targets` as null).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runtime.speech import Decoding
from surgery import __version__, pt2_save
from surgery.adapters import AdapterSpec, LoraSpec, StackSpec, spec_from_json
from surgery.capture import export_program
from surgery.errors import SurgeryError
from surgery.io import atomic_output
from surgery.signature import Signature
from surgery.sites import Site
from surgery.source import Source
from surgery.tasks import TASKS

if TYPE_CHECKING:
    from surgery.capture import Captured
    from surgery.insert import InsertReport

SUFFIX = ".adapted.pt2"
MANIFEST = "surgery.json"  # the manifest's name among the archive's extra files
TOOL = "surgery"
_REMAKE = "the file was edited or not written by surgery; re-create it with `surgery insert`"


@dataclass(frozen=True)
class Merged:
    """What `surgery merge` folded into the base weights, and what it measured (see pipeline.MergeResult)."""

    merged: int  # how many adapters
    kinds: tuple[str, ...]  # lora | linear-bottleneck
    output_max_abs_diff: float  # max |merged - adapted| on a padded test batch
    unmerge_max_abs_diff: float | None  # LoRA only: max |unmerge(merge(W)) - W|
    nodes: int  # the merged graph's node count


@dataclass(frozen=True)
class StackPart:
    """One model of a stack: the submodule prefix its adapters moved under, its file, its number of sites."""

    prefix: str
    source: str
    sites: int


@dataclass(frozen=True)
class Average:
    """How an averaged model was combined: from which files, with which weights, and what that means."""

    sources: tuple[str, ...]
    weights: tuple[float, ...]
    how: str


@dataclass(frozen=True)
class Peft:
    """Where an imported PEFT LoRA came from (`surgery import-peft`): its folder and the config keys that matter."""

    folder: str
    config: dict[str, Any]
    how: str


@dataclass(frozen=True)
class AdapterHub:
    """Where an imported AdapterHub adapter came from (`surgery import-adapters`): its folder, name and config,
    how its placement maps to sites, and what was skipped (a prediction head)."""

    folder: str
    name: str
    config: dict[str, Any]
    how: str
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    """A data file a model was trained or evaluated on: its name as given, its sha256 and its number of rows."""

    name: str
    sha256: str
    rows: int


Scalar = int | float | str | bool | None


@dataclass(frozen=True)
class Training:
    """How `surgery train` (or `AdaptedModel.save(training=...)`) trained the model: the data, the run and its result.

    `hyperparameters` and `metrics` are flat maps of names to scalars (`lr`, `batch_size`, ...; `eval_accuracy`,
    `train_loss`, ...); `labels` the class names of a classification head, in the head's order.
    """

    task: str
    data: Dataset
    steps: int  # optimizer steps taken
    epochs: float  # passes over the data (a run cut short by --max-steps ends within one)
    examples: int  # training examples seen
    trainable: int  # the parameters trained: adapters, head, norms
    hyperparameters: dict[str, Scalar]
    metrics: dict[str, float]
    eval_data: Dataset | None = None
    labels: tuple[str, ...] = ()
    truncated: int = 0  # texts cut to the model's positions

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SurgeryError(f"manifest: training task {self.task!r} is none of {', '.join(TASKS)}; {_REMAKE}")
        if min(self.steps, self.examples, self.trainable, self.truncated, self.data.rows) < 0 or self.epochs < 0:
            raise SurgeryError(f"manifest: the training record holds a negative count; {_REMAKE}")
        for key, value in {**self.hyperparameters, **self.metrics}.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, (int, float, str, bool))):
                raise SurgeryError(f"manifest: training record entry {key!r}={value!r} is not a scalar; {_REMAKE}")

    def to_json(self) -> dict[str, Any]:
        d = {**asdict(self), "labels": list(self.labels)}
        if self.eval_data is None:
            del d["eval_data"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Training:
        eval_data = d.get("eval_data")
        return cls(
            task=str(d["task"]),
            data=Dataset(**d["data"]),
            steps=int(d["steps"]),
            epochs=float(d["epochs"]),
            examples=int(d["examples"]),
            trainable=int(d["trainable"]),
            hyperparameters=dict(d["hyperparameters"]),
            metrics={str(k): float(v) for k, v in d["metrics"].items()},
            eval_data=Dataset(**eval_data) if eval_data is not None else None,
            labels=tuple(str(x) for x in d.get("labels", ())),
            truncated=int(d.get("truncated", 0)),
        )


@dataclass(frozen=True)
class Manifest:
    """What an `.adapted.pt2` holds: the adapters `adapter` put at `sites` of the model `source`.

    `merged`, `stack` and `average` say what `surgery merge` did, if anything, `peft` what `surgery import-peft`
    read, `adapterhub` what `surgery import-adapters` read, `training` how `surgery train` trained it; `route`
    names the models of a
    routed graph (in memory only: route.py). Validated here, so a damaged file fails when it is opened.
    """

    source: Source
    adapter: AdapterSpec | LoraSpec | StackSpec
    sites: tuple[Site, ...]
    trainable: int  # the adapters' parameters
    total: int  # all parameters, the base's included
    signature: Signature
    version: str = __version__  # of the tool that wrote it
    merged: Merged | None = None
    stack: tuple[StackPart, ...] | None = None
    average: Average | None = None
    peft: Peft | None = None
    route: tuple[str, ...] | None = None
    adapterhub: AdapterHub | None = None
    task: str = "feature-extraction"  # the head captured (tasks.py); manifests before it had none: feature-extraction
    training: Training | None = None  # what `surgery train` did, if anything
    decoding: Decoding | None = None  # a speech recognizer's start and stop tokens (runtime/speech.py)

    def __post_init__(self) -> None:
        if not isinstance(self.adapter, (AdapterSpec, LoraSpec, StackSpec)):
            raise SurgeryError(f"manifest: adapter {self.adapter!r} is not an adapter spec; {_REMAKE}")
        if not self.sites or not all(isinstance(s, Site) for s in self.sites):
            raise SurgeryError(f"manifest: lists no adapted sites; {_REMAKE}")
        if not 0 <= self.trainable <= self.total:
            raise SurgeryError(f"manifest: {self.trainable} adapter parameters of {self.total} in all; {_REMAKE}")
        if self.task not in TASKS:
            raise SurgeryError(f"manifest: task {self.task!r} is none of {', '.join(TASKS)}; {_REMAKE}")
        if isinstance(self.adapter, StackSpec) != (self.stack is not None):
            raise SurgeryError(f"manifest: a stack's adapter and its parts must come together; {_REMAKE}")

    @property
    def widths(self) -> dict[str, int]:
        """Each site's width d, by module path."""
        return {s.path: s.width for s in self.sites}

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "tool": TOOL,
            "version": self.version,
            "source": self.source.to_json(),
            "adapter": self.adapter.to_json(),
            "sites": [s.to_json() for s in self.sites],
            "params": {"trainable": self.trainable, "total": self.total},
            "signature": self.signature.to_json(),
        }
        if self.task != "feature-extraction":  # the head before tasks existed: such files stay as they were
            d["task"] = self.task
        if self.merged is not None:
            d["merged"] = {**asdict(self.merged), "kinds": list(self.merged.kinds)}
        if self.stack is not None:
            d["stack"] = [asdict(p) for p in self.stack]
        if self.average is not None:
            a = self.average
            d["average"] = {"sources": list(a.sources), "weights": list(a.weights), "how": a.how}
        if self.peft is not None:
            d["peft"] = asdict(self.peft)
        if self.route is not None:
            d["route"] = list(self.route)
        if self.adapterhub is not None:
            d["adapterhub"] = {**asdict(self.adapterhub), "skipped": list(self.adapterhub.skipped)}
        if self.training is not None:
            d["training"] = self.training.to_json()
        if self.decoding is not None:
            d["decoding"] = self.decoding.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        """A manifest as `to_json` (or an earlier version) wrote it; a damaged one is a SurgeryError saying so."""
        if not isinstance(d, dict) or d.get("tool") != TOOL:
            raise SurgeryError(f"{where}: not a surgery manifest; {_REMAKE}")
        try:
            merged, average, peft = d.get("merged"), d.get("average"), d.get("peft")
            return cls(
                source=Source(**d["source"]),
                adapter=spec_from_json(d["adapter"]),
                sites=tuple(Site.from_json(s) for s in d["sites"]),
                trainable=int(d["params"]["trainable"]),
                total=int(d["params"]["total"]),
                signature=Signature.from_json(d["signature"]),
                version=str(d["version"]),
                merged=Merged(**{**merged, "kinds": tuple(merged["kinds"])}) if merged is not None else None,
                stack=tuple(StackPart(**p) for p in d["stack"]) if "stack" in d else None,
                average=Average(tuple(average["sources"]), tuple(average["weights"]), average["how"])
                if average
                else None,
                peft=Peft(**peft) if peft is not None else None,
                route=tuple(d["route"]) if "route" in d else None,
                adapterhub=_adapterhub(d.get("adapterhub")),
                task=str(d.get("task", "feature-extraction")),
                training=Training.from_json(d["training"]) if d.get("training") is not None else None,
                decoding=Decoding.from_json(d["decoding"]) if d.get("decoding") is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SurgeryError(f"{where}: damaged manifest ({type(exc).__name__}: {exc}); {_REMAKE}") from exc


def _adapterhub(d: dict[str, Any] | None) -> AdapterHub | None:
    return None if d is None else AdapterHub(**{**d, "skipped": tuple(d.get("skipped", ()))})


def adapted_manifest(
    captured: Captured, spec: AdapterSpec | LoraSpec | StackSpec, report: InsertReport, **extra: Any
) -> Manifest:
    """The manifest of `captured` adapted by `spec` as `report` says; `extra`: merged, stack, average or peft."""
    return Manifest(
        source=captured.source,
        adapter=spec,
        sites=tuple(report.sites),
        trainable=report.trainable,
        total=report.total,
        signature=captured.signature,
        task=captured.task,
        decoding=captured.decoding,
        **extra,
    )


def save_program(
    path: str | Path, gm: torch.nn.Module, manifest: Manifest, files: dict[str, str] | None = None
) -> None:
    """Re-export `gm` over its manifest's signature (same dynamic axes) and save it with the manifest, atomically.

    The archive is checked as this tool checks a `.pt2` it opens (`check_pt2`: a scan of its graph, not a second
    load) before it takes its name: a program that calls an operator only this process has registered (transformers'
    own kernels) is refused, and no file is written."""
    from surgery.safe_files import check_pt2

    program = export_program(gm, manifest.signature, str(path))
    with atomic_output(path) as tmp:
        text = json.dumps(manifest.to_json(), indent=1)
        pt2_save.save(program, tmp, extra_files={MANIFEST: text, **(files or {})})
        try:
            check_pt2(tmp, str(path))
        except SurgeryError as exc:
            why = str(exc).split(": member ", 1)[-1].split(": opening the file", 1)[0]
            raise SurgeryError(
                f"{path}: not written: the program's {why}, so neither this tool nor torch.export.load could open "
                "it; capture the model without that operator (for transformers' experts, an experts_implementation "
                "of plain ops such as batched_mm)"
            ) from exc


def save_adapted(
    path: str | Path,
    captured: Captured,
    spec: AdapterSpec | LoraSpec | StackSpec,
    report: InsertReport,
    *,
    merged: Merged | None = None,
    stack: tuple[StackPart, ...] | None = None,
    average: Average | None = None,
    peft: Peft | None = None,
    adapterhub: AdapterHub | None = None,
    files: dict[str, str] | None = None,
) -> Manifest:
    """Re-export the adapted GraphModule (same dynamic axes) and save it with its manifest, atomically.

    `merged`, `stack`, `average` say what `surgery merge` did, `peft` what `import-peft` read, `adapterhub` what
    `import-adapters` read; `files` are
    more extra files of the archive (text).
    """
    meta = adapted_manifest(
        captured, spec, report, merged=merged, stack=stack, average=average, peft=peft, adapterhub=adapterhub
    )
    save_program(path, captured.gm, meta, files)
    return meta


def read_manifest(extra_files: dict[str, str], name: str) -> Manifest | None:
    """The manifest among the extra files `torch.export.load` read from `name` (asked for as `{MANIFEST: ""}`);
    None for a `.pt2` this tool did not write."""
    text = extra_files.get(MANIFEST)
    if not text:
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SurgeryError(f"{name}: its {MANIFEST} is not JSON ({exc}); {_REMAKE}") from exc
    return Manifest.from_json(d, where=f"{name}: {MANIFEST}")
