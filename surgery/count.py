"""Parameter counts from a config alone, on the `meta` device: no weights, no memory, any size.

The model is built with `torch.device("meta")` (shapes without storage), its sites are found by module path
with the architecture table the graph passes use (`surgery/architectures.py`), and the adapters are the
very modules the insert pass creates (`insert.make_adapter`), also on the meta device. The count is the sum of
their parameters' sizes, never a formula; the seed's formula rides along only to be compared with it.

    >>> count("gpt3-175b", AdapterSpec("houlsby", r=8)).trainable
    40109568
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapters import METHODS, AdapterSpec, LoraSpec
from surgery.errors import SurgeryError
from surgery.insert import bottleneck_params, make_adapter
from surgery.load import DEFAULT_MODEL, _minilm_path, _model_class
from surgery.architectures import ARCHITECTURES, CROSS_OUT, BUILTIN, architecture, lora_matches, match, parallel_matches
from surgery.sites import TARGET, Site

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
        raise SurgeryError(
            f"{source}: not a readable Hugging Face config ({exc}); fix or regenerate config.json"
        ) from exc


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
    """The sites the insert pass would adapt, found by module path in an (unexported) model, with the table's
    matching (`architectures.match`), the same the graph passes use."""
    modules = dict(model.named_modules())
    linear = [p for p, m in modules.items() if isinstance(m, nn.Linear) or hasattr(m, "nf")]

    def width(path: str) -> int:  # a projection's output; a non-projection role (a mixture of experts) is d_model
        return _dims(modules[path])[1] if path in linear else int(model.config.hidden_size)

    if isinstance(spec, LoraSpec):
        sites = []
        for m in lora_matches(model_type, linear, spec.targets):
            d_in, d_out = _dims(modules[m.path])
            width_ = d_out // m.part[1] if m.part else d_out
            sites.append(Site(m.path, m.layer, m.role, width_, "", "", m.path, d_in, m.part))
        return sites
    if spec.method == "parallel":
        return [
            Site(last.path, last.layer, role, width(last.path), "", "", first.path, _dims(modules[first.path])[0])
            for first, last, role in parallel_matches(model_type, linear, spec.blocks)
        ]
    if spec.targets is not None:
        found = match(linear, {TARGET: spec.targets}, (TARGET,))
        return [Site(m.path, m.layer, TARGET, width(m.path), "") for m in found]
    arch = architecture(model_type)
    if arch is None:
        known = ", ".join(ARCHITECTURES)
        raise SurgeryError(
            f"{model_type} is not in the architecture table (known: {known}); name the sites with --targets REGEX"
        )
    roles = [r for r in METHODS[spec.method] if r in arch.roles]
    return [Site(m.path, m.layer, m.role, width(m.path), "") for m in match(modules, arch.roles, roles)]


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
    per_layer = len([r for r in METHODS[spec.method] if r != CROSS_OUT])  # the seed's models have no decoder
    text = {2: "2L(2·d·r + d + r)", 1: "L(2·d·r + d + r)"}[per_layer]
    return per_layer * layers * bottleneck_params(d, spec.r), text
