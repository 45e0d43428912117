"""Whole models, file to file: what the commands share (open a source, adapt it) and what `surgery merge`
does with `.adapted.pt2` files (open and lift, merge or combine, measure, and the LoRA tensors a merged file
keeps for --unmerge). The graph passes themselves are in insert.py and merge.py.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from surgery.adapters import AdapterSpec, LoRA, LoraSpec, StackSpec, make_adapter, stand_in_weights
from surgery.bundle import Average, Manifest, Merged, StackPart, save_adapted
from surgery.capture import Captured, capture
from surgery.errors import SurgeryError
from surgery.graph import adapter_nodes, adapter_target, lift_adapters
from surgery.insert import InsertReport, insert_adapters, sites_for
from surgery.load import DEFAULT_MODEL, load
from surgery.merge import MergeReport, average_adapters, merge_adapters, stack_adapters, unmerge_lora
from surgery.parity import compare, mask_of, outputs_of
from surgery.sites import ADAPTER_ROOT, Site


def open_model(
    source: str | None,
    *,
    trust: bool = False,
    input_shapes: list[str] | None = None,
    input_dtype: str = "float32",
    dtype: str = "auto",
    task: str | None = None,
) -> Captured:
    """Load `source` in `dtype` (auto: the checkpoint's own) with the head of `task` (tasks.py) and capture it."""
    return capture(
        load(source, trust=trust, input_shapes=input_shapes, input_dtype=input_dtype, dtype=dtype, task=task)
    )


def adapt(captured: Captured, spec: AdapterSpec | LoraSpec, seed: int = 0) -> InsertReport:
    """Insert `spec`'s adapters into a captured base model (in place). Refuses an already adapted one."""
    if captured.manifest is not None:
        a = captured.manifest.adapter
        r = f", r={a.r}" if isinstance(a, AdapterSpec) else f", r={a.ranks}" if isinstance(a, LoraSpec) else ""
        raise SurgeryError(
            f"{captured.source.name} is already adapted ({a.method}{r}); "
            f"insert into its base model instead: {captured.manifest.source.name}"
        )
    sites = sites_for(captured.gm, captured.source.model_type, spec)
    torch.manual_seed(seed)  # the down-projections' random init repeats run to run
    return insert_adapters(captured.gm, sites, spec)


def stand_in_adapted(
    base: Captured, spec: AdapterSpec | LoraSpec, path: str | Path, seed: int = 0, weights_seed: int | None = None
) -> Captured:
    """An adapted copy of `base` with stand-in adapter weights (`stand_in_weights`, seeded `weights_seed`,
    default `seed`), saved to `path` as an .adapted.pt2 and reopened, as a trained model would arrive."""
    captured = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    report = adapt(captured, spec, seed=seed)
    stand_in_weights(captured.gm, seed=seed if weights_seed is None else weights_seed)
    save_adapted(path, captured, spec, report)
    return open_model(str(path))


def default_output(source: str | None, suffix: str) -> Path:
    """In the working folder: minilm -> minilm{suffix}, a/model.adapted.pt2 -> model.adapted{suffix},
    a/folder -> folder{suffix}, a/folder/config.json -> folder{suffix}."""
    path = Path(source or DEFAULT_MODEL)
    if path.name == "config.json":
        stem = path.resolve().parent.name
    elif path.is_file():
        stem = path.stem
    else:
        stem = path.resolve().name if path.is_dir() else path.name
    return Path(f"{stem}{suffix}")


# Whole models: what `surgery merge` does with .pt2 files (open, lift, pass, check, save).

PACK = "lora.safetensors.b64"  # a merged model's LoRA tensors (safetensors, base64), for --unmerge


@dataclass(frozen=True)
class MergeResult:
    """A merged model: what was folded, |merged - adapted| on a test batch, |unmerge(merge(W)) - W|, node count."""

    report: MergeReport
    output_max_abs_diff: float
    unmerge_max_abs_diff: float | None  # LoRA only: the weights restored by unmerge_lora against the originals
    nodes: int

    @property
    def manifest(self) -> Merged:
        """What the merged model's manifest records."""
        kinds = tuple(sorted(set(self.report.merged.values())))
        return Merged(len(self.report.merged), kinds, self.output_max_abs_diff, self.unmerge_max_abs_diff, self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.manifest), "kinds": list(self.manifest.kinds)}


def check_same_base(manifests: list[Manifest], names: list[str]) -> None:
    """Stacking and averaging combine adapters of one base model: same source weights (sha256)."""
    first = manifests[0].source
    for m, name in zip(manifests[1:], names[1:]):
        if m.source.sha256 != first.sha256:
            raise SurgeryError(
                f"{name} adapts {m.source.name} and {names[0]} adapts {first.name}: different base models "
                f"(sha256 {m.source.sha256[:12]} vs {first.sha256[:12]}); combine adapters of one base only"
            )


def open_adapted(source: str, trust: bool = False) -> tuple[Captured, AdapterSpec | LoraSpec, list[Site]]:
    """An adapted `.pt2` written by this tool, its spec and sites, with its adapters lifted to modules."""
    captured = open_model(source, trust=trust)
    m = captured.manifest
    if m is None:
        raise SurgeryError(
            f"{source} is not an adapted model (no surgery manifest); adapt it first with `surgery insert`"
        )
    if m.merged is not None:
        raise SurgeryError(f"{source} is already merged into its base weights; to get its adapters back use --unmerge")
    if isinstance(m.adapter, StackSpec):
        raise SurgeryError(
            f"{source} is a stack of adapters; merge, stack or average the models it was made of instead"
        )
    sites = list(m.sites)
    lift_adapters(captured.gm, m.adapter, sites)
    captured.source = m.source  # what the result adapts: the base, not this file
    return captured, m.adapter, sites


def _merge_batch(captured: Captured) -> list[torch.Tensor]:
    """The padded test batch a merge is measured on (3 rows of 24 where the model takes a sequence)."""
    sizes = {"batch": 3, "seq": 24} if "seq" in captured.signature.axes() else None
    return captured.signature.examples(sizes, seed=1, pad=True)


def merge_model(captured: Any, sites: list[Site]) -> tuple[MergeResult, dict[str, LoRA]]:
    """Merge `captured`'s adapters (in place) and measure it: output against the adapted model, and for LoRA
    the weights `unmerge_lora` restores against the originals. Returns the LoRA modules too (for the pack)."""
    tensors = _merge_batch(captured)
    before = outputs_of(captured.gm, captured.signature, tensors)
    weights = {n: p.detach().clone() for n, p in captured.gm.named_parameters() if not n.startswith(ADAPTER_ROOT + ".")}
    modules = {str(n.target): captured.gm.get_submodule(str(n.target)) for n in adapter_nodes(captured.gm)}
    loras = {t: copy.deepcopy(m) for t, m in modules.items() if isinstance(m, LoRA)}
    report = merge_adapters(captured.gm)
    parity = compare(
        before,
        outputs_of(captured.gm, captured.signature, tensors),
        mask=mask_of(captured.signature, tensors),
        where="merged against adapted",
    )
    if not parity.ok:  # folding is exact algebra: a difference beyond rounding is a bug, not a result
        raise SurgeryError(f"{captured.source.name}: the merged model differs from the adapted one: {parity.summary()}")
    out_diff = parity.max_abs_diff
    restored = None
    if loras and set(report.merged.values()) == {"lora"}:
        probe = copy.deepcopy(captured.gm)
        unmerge_lora(probe, copy.deepcopy(loras), sites)
        restored = max(float((probe.get_parameter(n) - w).abs().max()) for n, w in weights.items())
    return MergeResult(report, out_diff, restored, len(captured.gm.graph.nodes)), loras


def pack_loras(loras: dict[str, LoRA]) -> str:
    """LoRA tensors as base64 safetensors text (an extra file of the merged .pt2), named as in the graph."""
    from safetensors.torch import save

    tensors = {f"{t}.{k}": v.detach().contiguous() for t, m in loras.items() for k, v in m.state_dict().items()}
    return base64.b64encode(save(tensors)).decode("ascii")


def read_pack(path: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors a merged .pt2 carries (see `pack_loras`)."""
    from safetensors.torch import load

    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(f"/extra/{PACK}")]
        if not names:
            raise SurgeryError(
                f"{path}: a merged model without its LoRA tensors ({PACK}); only merged LoRA can be unmerged"
            )
        return load(base64.b64decode(zf.read(names[0])))


def unmerge_model(source: str, trust: bool = False) -> tuple[Captured, LoraSpec, list[Site], float | None]:
    """A merged LoRA .pt2 back to its adapted model (in memory), with its spec and sites, and the largest
    |unmerge(merge(W)) − W| that `merge_model` measured when it merged (the same arithmetic as here)."""
    captured = open_model(source, trust=trust)
    m = captured.manifest
    if m is None or m.merged is None:
        raise SurgeryError(f"{source} is not a merged model; --unmerge takes the output of `surgery merge`")
    spec = m.adapter
    if not isinstance(spec, LoraSpec):
        raise SurgeryError(
            f"{source} merged a {spec.method} adapter; only LoRA is unmerged "
            "(a folded bottleneck is not invertible in general)"
        )
    sites = list(m.sites)
    tensors = read_pack(source)
    loras = {}
    for site in sites:
        t = adapter_target(site)
        lora = make_adapter(spec, site)
        lora.load_state_dict({k: tensors[f"{t}.{k}"] for k in ("lora_A", "lora_B")})
        loras[t] = lora
    unmerge_lora(captured.gm, loras, sites)
    captured.source = m.source
    return captured, spec, sites, m.merged.unmerge_max_abs_diff


def adapted_report(gm: fx.GraphModule, sites: list[Site]) -> InsertReport:
    """Parameter counts of an adapted GraphModule: the adapters' and the total."""
    params = list(gm.named_parameters())
    adapters = sum(p.numel() for n, p in params if n.startswith(ADAPTER_ROOT + "."))
    return InsertReport(list(sites), adapters, sum(p.numel() for _, p in params))


@dataclass(frozen=True)
class Combined:
    """Several adapted models as one: the model (the first source's, rewritten), its spec and sites, and what
    the manifest records of how it was combined (`stack` or `average`)."""

    captured: Captured
    spec: AdapterSpec | LoraSpec | StackSpec
    sites: list[Site]
    stack: tuple[StackPart, ...] | None = None
    average: Average | None = None


def combine_models(sources: list[str], weights: list[float] | None, trust: bool = False) -> Combined:
    """Several adapted .pt2 of one base as one model: stacked (`weights` None) or averaged with `weights`."""
    opened = [open_adapted(source, trust) for source in sources]
    manifests = [c.manifest for c, _, _ in opened]
    check_same_base([m for m in manifests if m is not None], sources)
    first, spec, sites = opened[0]
    if weights is None:
        all_sites = list(sites)
        for k, (other, _, other_sites) in enumerate(opened[1:], 1):
            all_sites += stack_adapters(first.gm, other.gm, other_sites, prefix=f"{ADAPTER_ROOT}.{k}")
        parts = tuple(
            StackPart(ADAPTER_ROOT if k == 0 else f"{ADAPTER_ROOT}.{k}", source, len(s))
            for k, (source, (_, _, s)) in enumerate(zip(sources, opened))
        )
        return Combined(first, StackSpec(tuple(s for _, s, _ in opened)), all_sites, stack=parts)
    methods = {s.method for _, s, _ in opened}
    if len(methods) > 1:
        raise SurgeryError(
            f"--average: the models use different methods ({', '.join(sorted(methods))}); "
            "average adapters of one method only"
        )
    average_adapters(first.gm, [c.gm for c, _, _ in opened[1:]], weights)
    if isinstance(spec, LoraSpec):
        spec = LoraSpec({role: r * len(sources) for role, r in spec.ranks.items()})
        how = "weighted sum of the deltas A·B, one LoRA of the summed rank (exact)"
    else:
        how = "weighted average of the parameters"
    return Combined(first, spec, sites, average=Average(tuple(sources), tuple(weights), how))
