"""Parameter counts from a config alone, on the `meta` device: no weights, no memory, any size.

The model is built with `torch.device("meta")` (shapes without storage), its sites are found by module path
with the same presets the graph passes use (`sites.PRESETS`, `sites.PROJECTIONS`), and the adapters are the
very modules the insert pass creates (`insert.make_adapter`), also on the meta device. The count is the sum of
their parameters' sizes, never a formula; the seed's formula rides along only to be compared with it.

    >>> count("gpt3-175b", AdapterSpec("houlsby", r=8)).trainable
    40109568
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapters import METHODS, AdapterSpec, LoraSpec
from surgery.errors import SurgeryError
from surgery.insert import bottleneck_params, make_adapter
from surgery.load import DEFAULT_MODEL, _minilm_path, _model_class
from surgery.sites import PARALLEL_BLOCKS, PRESETS, PROJECTIONS, TARGET, Site

# Built-in shapes: GPT-3 175B is a GPT-2 architecture (pre-norm, learned positions, 4·d feed-forward).
BUILTIN: dict[str, dict[str, Any]] = {
    "gpt3-175b": dict(model_type="gpt2", n_layer=96, n_embd=12288, n_head=96, n_positions=2048, vocab_size=50257),
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16),
}
BYTES = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class CountReport:
    """Trainable parameters of an adapter spec on a model shape, their share of the base, and pack sizes."""

    source: str
    model_type: str
    layers: int
    d_model: int
    adapter: dict[str, Any]
    sites: int
    trainable: int
    base: int
    formula: int | None  # the seed's formula for the same spec, where one applies
    formula_text: str | None

    @property
    def share(self) -> float:
        return self.trainable / self.base

    def pack_bytes(self) -> dict[str, int]:
        return {k: self.trainable * b for k, b in BYTES.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_type": self.model_type,
            "layers": self.layers,
            "d_model": self.d_model,
            "adapter": self.adapter,
            "sites": self.sites,
            "trainable_params": self.trainable,
            "base_params": self.base,
            "share_of_base": self.share,
            "pack_bytes": self.pack_bytes(),
            "formula_params": self.formula,
            "formula": self.formula_text,
        }


def load_config(source: str) -> Any:
    """A transformers config: a built-in name, `minilm`, a config.json, or a model folder holding one."""
    from transformers import AutoConfig

    if source in BUILTIN:
        kwargs = dict(BUILTIN[source])
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    path = _minilm_path() / "config.json" if source == DEFAULT_MODEL else Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SurgeryError(
            f"{source}: no such config; give a config.json, a model folder, '{DEFAULT_MODEL}', "
            f"or a built-in shape ({', '.join(BUILTIN)})"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as exc:
        raise SurgeryError(f"{source}: not a readable Hugging Face config ({exc}); fix or regenerate config.json") from exc


def meta_model(config: Any) -> nn.Module:
    """The architecture with every tensor on the meta device: sizes, no storage."""
    cls = _model_class(config)
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def _dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a projection: nn.Linear, or transformers' Conv1D (weight stored (d_in, d_out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise SurgeryError(f"{type(module).__name__} is not a projection this tool counts (nn.Linear or Conv1D)")


def module_sites(model: nn.Module, model_type: str, spec: AdapterSpec | LoraSpec) -> list[Site]:
    """The sites the insert pass would adapt, found by module path in an (unexported) model."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "nf")}

    def matches(pattern: str) -> list[tuple[str, int]]:
        return [(p, int(m.group(1)) if m.groups() else 0) for p in modules if (m := re.search(pattern, p))]

    if isinstance(spec, LoraSpec) or spec.method == "parallel":
        table = PROJECTIONS.get(model_type)
        if table is None:
            raise SurgeryError(
                f"{spec.method} needs the projections of the architecture; {model_type} has no preset "
                f"(known: {', '.join(PROJECTIONS)})"
            )
    if isinstance(spec, LoraSpec):
        unknown = [r for r in spec.targets if r not in table]
        if unknown:
            raise SurgeryError(f"--targets: {model_type} has no projection {', '.join(unknown)}; choose from: {', '.join(table)}")
        sites = []
        for role in spec.targets:
            pattern, part = table[role]
            for path, layer in matches(pattern):
                d_in, d_out = _dims(modules[path])
                width = d_out // part[1] if part else d_out
                sites.append(Site(path, layer, role, width, "", "", path, d_in, part))
        return sites
    if spec.method == "parallel":
        sites = []
        for block in spec.blocks:
            first, last, role = PARALLEL_BLOCKS[block]
            firsts = {layer: p for p, layer in reversed(matches(table[first][0]))}
            sites += [
                Site(p, layer, role, _dims(modules[p])[1], "", "", firsts[layer], _dims(modules[firsts[layer]])[0])
                for p, layer in matches(table[last][0])
                if layer in firsts
            ]
        return sites
    if spec.targets is not None:
        return [Site(p, layer, TARGET, _dims(modules[p])[1], "") for p, layer in matches(spec.targets)]
    preset = PRESETS.get(model_type)
    if preset is None:
        raise SurgeryError(f"{model_type} has no preset of sites (known: {', '.join(PRESETS)}); name them with --targets REGEX")
    return [
        Site(p, layer, role, _dims(modules[p])[1], "")
        for role in METHODS[spec.method]
        for p, layer in matches(getattr(preset, role))
    ]


def count(source: str, spec: AdapterSpec | LoraSpec) -> CountReport:
    """Count `spec`'s adapters on the model `source` describes, from parameters created on the meta device."""
    config = load_config(source)
    model = meta_model(config)
    sites = module_sites(model, config.model_type, spec)
    if not sites:
        raise SurgeryError(f"{source}: no sites for {spec.method} found in the {config.model_type} architecture")
    with torch.device("meta"):
        adapters = [make_adapter(spec, site) for site in sites]
    trainable = sum(p.numel() for a in adapters for p in a.parameters())
    base = sum(p.numel() for p in model.parameters())
    layers, d = int(config.num_hidden_layers), int(config.hidden_size)
    formula, text = seed_formula(spec, layers, d)
    return CountReport(source, config.model_type, layers, d, spec.to_json(), len(sites), trainable, base, formula, text)


def seed_formula(spec: AdapterSpec | LoraSpec, layers: int, d: int) -> tuple[int | None, str | None]:
    """The seed's closed form for a spec on L layers of width d, where one applies."""
    if isinstance(spec, LoraSpec):
        if not set(spec.targets) <= set("qkvo"):
            return None, None
        return layers * sum(r * 2 * d for r in spec.ranks.values()), "L·Σ r·(d + d) over the d×d projections"
    if spec.targets is not None:
        return None, None
    per_layer = len(METHODS[spec.method])
    text = {2: "2L(2·d·r + d + r)", 1: "L(2·d·r + d + r)"}[per_layer]
    return per_layer * layers * bottleneck_params(d, spec.r), text
