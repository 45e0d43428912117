"""AdapterHub folders as adapted models: what `adapters`' `model.save_adapter(folder, name)` wrote, onto its base.

A folder holds `adapter_config.json` and `pytorch_adapter.bin` (a torch.save pickle, read with
`torch.load(weights_only=True)`: tensors only, never code) or `adapter.safetensors`. The result computes what
`adapters` 1.3 computes (tested against its own forward on stored references, tests/data/adapterhub).

**Bottlenecks** (`seq_bn` Pfeiffer, `double_seq_bn` Houlsby, `par_bn` parallel, and any BnConfig): `adapters`
calls a bottleneck layer with the sublayer output y, the residual x and, in a post-LN block (BERT), the block's
own LayerNorm; in GPT-2 with no norm. With a = y + x, z = LN(a), f = up(σ(down ·))·scaling, it computes

| options (original_ln_before, residual_before_ln, original_ln_after) | post-LN (BERT) | pre-LN (GPT-2) | site form |
|---|---|---|---|
| False, any, True (Houlsby) | LN(y + f(y) + x) | y + f(y) + x | after y (the usual site) |
| True, True, True (Pfeiffer) | LN(y + f(z) + x) | a + f(a) | `before_norm` / `after_add` |
| True, False, False (AdapterPlus) | z + f(z) | a + f(a) | `after_norm` / `after_add` |
| parallel, original_ln_after True | LN(y + f(x) + x) | y + f(x) + x | beside: reads x, adds to y |

Other combinations (they drop the residual, or add it twice) are refused by name. `scaling` (a number, or the
`learned` / `channel` tensors) is folded into the up-projection for sequential bottlenecks; a parallel adapter's
number stays its `scale`. `init_weights`, `dropout` and `stochastic_depth` do not change the eval forward.
Refused by name: `adapters`' own layer norms around the bottleneck (`ln_before`, `ln_after`), `phm_layer`
(Compacter), `use_gating` (its gate averages over the sequence), invertible adapters, cross-attention adapters,
prefix tuning and the other non-bottleneck methods. A prediction head saved beside (`head_config.json`) is
reported and skipped.

**LoRA** (`architecture: lora`): y + (alpha/r)·B(A(x)) beside q, k, v (`attn_matrices`), the intermediate
(`intermediate_lora`) and output (`output_lora`) projections, as this tool's LoRA with the same alpha; on GPT-2's
fused `c_attn`, `adapters`' grouped lora_A/lora_B are split into one LoRA per slice. Refused: gating, DoRA, VeRA,
(IA)³ (`composition_mode: scale`).

Supported families: those whose `adapters` model calls the bottleneck as above (`FAMILIES`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import fx

from surgery.adapters import AdapterSpec, LoraSpec
from surgery.architectures import ATTN_OUT, FFN_OUT
from surgery.bundle import AdapterHub
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.graph import adapter_target, set_lora
from surgery.insert import InsertReport, insert_adapters
from surgery.peft_import import adapter_files, read_tensors, resolve
from runtime.files import read_config
from surgery.sites import (
    AFTER_ADD,
    AFTER_NORM,
    BEFORE_NORM,
    Site,
    _Modules,
    find_sites,
    linear_modules,
    module_path,
    projection_sites,
)

aten = torch.ops.aten

# model_type -> whether `adapters` hands the bottleneck the block's own LayerNorm (post-LN) or none (GPT-2)
FAMILIES = {"bert": True, "roberta": True, "xlm-roberta": True, "electra": True, "deberta-v2": True, "gpt2": False}
WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")  # in order of preference
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
SAVE = "model.save_adapter(folder, name)"
# `adapters`' non_linearity (transformers' get_activation names) -> this tool's activation
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu", "tanh": "tanh", "linear": "identity"}
LORA_TARGETS = {"q": "q", "k": "k", "v": "v"}
KEEP = (
    "reduction_factor",
    "non_linearity",
    "mh_adapter",
    "output_adapter",
    "original_ln_before",
    "original_ln_after",
    "residual_before_ln",
    "is_parallel",
    "scaling",
    "init_weights",
    "leave_out",
    "r",
    "alpha",
    "attn_matrices",
    "intermediate_lora",
    "output_lora",
    "selfattn_lora",
)


def read_adapterhub(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """The saved config (with its `config`), tensors and the names of skipped files, after the refusals."""
    folder = Path(folder)
    config_path, weights_path = adapter_files(
        folder,
        WEIGHT_FILES,
        "not an AdapterHub adapter folder (needs adapter_config.json and pytorch_adapter.bin or "
        f"adapter.safetensors); save it with {SAVE}",
    )
    saved = read_config(config_path, str(folder))
    config = saved.get("config")
    if not isinstance(config, dict) or not isinstance(saved.get("name"), str):
        raise SurgeryError(f"{config_path}: no adapter `config` and `name`; not written by {SAVE}")
    _refuse(config, str(folder))
    skipped = [n for n in HEAD_FILES if (folder / n).is_file()]
    return saved, read_tensors(weights_path, SAVE), skipped


def _refuse(config: dict[str, Any], where: str) -> None:
    """One line per option this tool's adapters cannot express, naming it."""
    kind = config.get("architecture")
    if kind == "prefix_tuning":
        raise SurgeryError(
            f"{where}: prefix_tuning is not supported: it prepends trained keys and values to attention, "
            "not a bottleneck or LoRA; train a bottleneck (seq_bn, double_seq_bn, par_bn) or LoRA adapter"
        )
    if kind == "lora":
        if config.get("composition_mode", "add") != "add":
            raise SurgeryError(f"{where}: (IA)^3 (composition_mode {config['composition_mode']!r}) is not supported")
        for key, name in (("use_dora", "DoRA (use_dora)"), ("use_gating", "use_gating")):
            if config.get(key):
                raise SurgeryError(f"{where}: LoRA with {name} is not supported; train a plain LoRA")
        if config.get("vera_d") is not None or config.get("vera_b") is not None:
            raise SurgeryError(f"{where}: VeRA (vera_d, vera_b) is not supported; train a plain LoRA")
        return
    if kind is not None:
        raise SurgeryError(
            f"{where}: AdapterHub method {kind!r} is not supported; only bottleneck adapters and LoRA import"
        )
    if config.get("phm_layer"):
        raise SurgeryError(
            f"{where}: phm_layer (Compacter) is not supported: its projections are sums of Kronecker products; "
            "train a plain bottleneck (seq_bn or double_seq_bn)"
        )
    for key in ("ln_before", "ln_after"):
        if config.get(key):
            raise SurgeryError(
                f"{where}: {key} (a LayerNorm of the adapter's own around the bottleneck) is not supported; "
                f"train the adapter with {key}=False"
            )
    if config.get("use_gating"):
        raise SurgeryError(
            f"{where}: use_gating is not supported: the gate averages over the sequence; train with use_gating=False"
        )
    if config.get("inv_adapter"):
        raise SurgeryError(f"{where}: inv_adapter (an invertible adapter on the embeddings) is not supported")
    if config.get("cross_adapter"):
        raise SurgeryError(f"{where}: cross_adapter (adapters after cross-attention) is not supported")
    act = str(config.get("non_linearity", "relu")).lower()
    if act not in ACTIVATIONS:
        raise SurgeryError(f"{where}: non_linearity {act!r} is not supported; use one of: {', '.join(ACTIVATIONS)}")


def import_adapterhub(
    captured: Captured, folder: str | Path
) -> tuple[AdapterSpec | LoraSpec, InsertReport, AdapterHub]:
    """Insert an AdapterHub folder's adapter into a captured base model (in place)."""
    if captured.manifest is not None:
        raise SurgeryError(f"{captured.source.name} is already adapted; import AdapterHub adapters into its base model")
    saved, tensors, skipped = read_adapterhub(folder)
    model_type = captured.source.model_type
    if model_type not in FAMILIES:
        raise SurgeryError(
            f"{folder}: AdapterHub import places adapters as `adapters` does on {', '.join(FAMILIES)}; "
            f"the base is {model_type or 'not a Hugging Face model'}"
        )
    if saved.get("model_type") not in (None, model_type):
        raise SurgeryError(f"{folder}: the adapter was trained on a {saved['model_type']}, --base is a {model_type}")
    config, name = saved["config"], saved["name"]
    if config.get("architecture") == "lora":
        spec, report, how = _import_lora(captured, config, name, tensors)
    else:
        spec, report, how = _import_bottleneck(captured, config, name, tensors, FAMILIES[model_type])
    keep = {k: config[k] for k in KEEP if k in config}
    return spec, report, AdapterHub(str(folder), name, keep, how, tuple(skipped))


def _split(tensors: dict[str, torch.Tensor], name: str, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by the module path they hang from: `<path>.<kind>.<name>.<param>` -> {path: {param: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(rf"(.*)\.{kind}\.{re.escape(name)}\.(.+)$")
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None:
            raise SurgeryError(f"tensor {key} is not a {kind} tensor of adapter {name!r}; not written by {SAVE}")
        out.setdefault(m.group(1), {})[m.group(2)] = t
    return out


def _layer(path: str) -> int:
    m = re.search(r"\.(\d+)(\.|$)", path)
    if m is None:
        raise SurgeryError(f"adapter location {path}: no layer index in it; not written by {SAVE}")
    return int(m.group(1))


def _import_bottleneck(
    captured: Captured, config: dict[str, Any], name: str, tensors: dict[str, torch.Tensor], post_ln: bool
) -> tuple[AdapterSpec, InsertReport, str]:
    gm = captured.gm
    parallel = bool(config.get("is_parallel"))
    form = None if parallel else _form(config, post_ln)
    by_location = _split(tensors, name, "adapters")
    found = {(s.layer, s.role): s for s in find_sites(gm, captured.source.model_type)}
    mods, nodes = _Modules(gm), {n.name: n for n in gm.graph.nodes}
    sites, weights = [], {}
    for location, params in sorted(by_location.items(), key=lambda kv: (_layer(kv[0]), "attention" not in kv[0])):
        role = ATTN_OUT if "attention" in location else FFN_OUT  # mh_adapter (attention) or output_adapter
        site = found.get((_layer(location), role))
        unknown = set(params) - {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"}
        if site is None or unknown - {"scaling"}:
            what = (
                f"tensor {sorted(unknown - {'scaling'})[0]}" if site else f"no {role} site in layer {_layer(location)}"
            )
            raise SurgeryError(f"adapter location {location}: {what}; is --base the model it was trained on?")
        down, up = params["adapter_down.0.weight"], params["adapter_up.weight"]  # (r, d), (d, r)
        if down.shape[1] != site.width or up.shape != (site.width, down.shape[0]):
            raise SurgeryError(
                f"adapter location {location}: bottleneck {tuple(down.shape)}, the base's site is {site.width} wide; "
                "wrong --base?"
            )
        sites.append(_placed(gm, mods, nodes, site, form, parallel))
        weights[adapter_target(sites[-1])] = _weights(params, config, parallel)
    if not sites:
        raise SurgeryError(f"adapter {name!r} holds no bottleneck tensors; not written by {SAVE}")
    ranks = {w["down_w"].shape[1] for w in weights.values()}
    if len(ranks) != 1:
        raise SurgeryError(f"adapter {name!r}: bottleneck sizes {sorted(ranks)} differ by layer; one r per import")
    act = ACTIVATIONS[str(config.get("non_linearity", "relu")).lower()]
    roles = {s.role for s in sites}
    if parallel:
        scale = config.get("scaling", 1.0)
        targets = "attn,ffn" if ATTN_OUT in roles else "ffn"
        spec = AdapterSpec("parallel", ranks.pop(), act, targets, float(scale) if isinstance(scale, float) else 1.0)
    else:
        spec = AdapterSpec("houlsby" if ATTN_OUT in roles else "pfeiffer", ranks.pop(), act)
    report = insert_adapters(gm, sites, spec)
    with torch.no_grad():
        for target, state in weights.items():
            gm.get_submodule(target).load_state_dict(state)
    scaling = config.get("scaling", 1.0)
    folded = not isinstance(scaling, (int, float)) or (not parallel and scaling != 1.0)
    how = f"form {form or ('beside' if parallel else 'after the sublayer output')}" + (
        f"; scaling {scaling} folded into up_w, up_b" if folded else ""
    )
    return spec, report, how


def _form(config: dict[str, Any], post_ln: bool) -> str | None:
    """The site form of a sequential bottleneck's options (the table in the module docstring)."""
    before, after = bool(config.get("original_ln_before")), bool(config.get("original_ln_after", True))
    rbl = config.get("residual_before_ln", True)
    if not before and after and rbl is not None and rbl != "post_add":
        return None
    if before and after and rbl is True:
        return BEFORE_NORM if post_ln else AFTER_ADD
    if before and not after and rbl in (False, "post_add") and not (post_ln and rbl == "post_add"):
        return AFTER_NORM if post_ln else AFTER_ADD
    raise SurgeryError(
        f"original_ln_before={before}, residual_before_ln={rbl}, original_ln_after={after}: on this "
        f"{'post' if post_ln else 'pre'}-LN model `adapters` drops the residual or adds it twice, which no site form "
        "here expresses; supported: Houlsby (False, True, True), Pfeiffer (True, True, True), AdapterPlus "
        "(True, False, False)"
    )


def _placed(
    gm: fx.GraphModule, mods: _Modules, nodes: dict[str, fx.Node], site: Site, form: str | None, parallel: bool
) -> Site:
    """`site` (after a sublayer output y) moved to where `adapters` applies its bottleneck."""
    y = nodes[site.node]
    chain = mods.residual_branch(y)
    if chain is None:
        raise SurgeryError(f"site {site.path}: its output reaches no residual add; `adapters` places nothing here")
    a = chain[-1]
    x = next(arg for arg in a.args[:2] if isinstance(arg, fx.Node) and arg is not chain[-2])
    if parallel:
        user = next((u for u in x.users if u is not a and module_path(u)), None)
        return Site(
            site.path,
            site.layer,
            site.role,
            site.width,
            y.name,
            x.name,
            module_path(user) if user else None,
            site.width,
        )
    if form is None:
        return site
    if form == AFTER_ADD:
        return Site(site.path, site.layer, site.role, site.width, a.name, form=form)
    users = list(a.users)
    z = users[0] if len(users) == 1 and users[0].target is aten.layer_norm.default else None
    if z is None:
        raise SurgeryError(
            f"site {site.path}: no LayerNorm right after its residual add, which `adapters` expects here"
        )
    if form == AFTER_NORM:
        return Site(site.path, site.layer, site.role, site.width, z.name, form=form)
    return Site(site.path, site.layer, site.role, site.width, y.name, z.name, module_path(z), site.width, form=form)


def _weights(params: dict[str, torch.Tensor], config: dict[str, Any], parallel: bool) -> dict[str, torch.Tensor]:
    """This tool's bottleneck tensors (pre-transposed) from `adapters`' Linear weights; scaling folded into up
    unless it is a parallel adapter's number (kept as its `scale`)."""
    up_w, up_b = params["adapter_up.weight"].float().T, params["adapter_up.bias"].float()  # (r, d), (d,)
    scaling = config.get("scaling", 1.0)
    if "scaling" in params:  # learned (1,) or channel (d,)
        s = params["scaling"].float()
        up_w, up_b = up_w * s, up_b * s
    elif not parallel and isinstance(scaling, (int, float)) and scaling != 1.0:
        up_w, up_b = up_w * float(scaling), up_b * float(scaling)
    elif not isinstance(scaling, (int, float)):
        raise SurgeryError(f"scaling {scaling!r} names a tensor the adapter's file does not hold; save it again")
    return {
        "down_w": params["adapter_down.0.weight"].float().T.contiguous(),
        "down_b": params["adapter_down.0.bias"].float(),
        "up_w": up_w.contiguous(),
        "up_b": up_b.contiguous(),
    }


def _import_lora(
    captured: Captured, config: dict[str, Any], name: str, tensors: dict[str, torch.Tensor]
) -> tuple[LoraSpec, InsertReport, str]:
    gm = captured.gm
    matrices = [m for m in config.get("attn_matrices", ["q", "v"]) if config.get("selfattn_lora", True)]
    unknown = [m for m in matrices if m not in LORA_TARGETS]
    if unknown:
        raise SurgeryError(f"LoRA on attn_matrices {unknown} is not supported; q, k and v are")
    roles = tuple(
        matrices
        + (["ffn_in"] if config.get("intermediate_lora") else [])
        + (["ffn_out"] if config.get("output_lora") else [])
    )
    if not roles:
        raise SurgeryError(
            f"LoRA adapter {name!r} adapts no projection (selfattn_lora, intermediate_lora, output_lora)"
        )
    leave_out = set(config.get("leave_out") or [])
    sites = [s for s in projection_sites(gm, captured.source.model_type, roles) if s.layer not in leave_out]
    known = set(linear_modules(gm))
    by_module = {resolve(path, known, "AdapterHub's LoRA"): p for path, p in _split(tensors, name, "loras").items()}
    r, alpha = int(config["r"]), float(config["alpha"])
    pairs, used = {}, set()
    enabled = [m for m in "qkv" if m in matrices]
    for site in sites:
        params = by_module.get(site.path)
        if params is None or set(params) != {"lora_A", "lora_B"}:
            raise SurgeryError(f"LoRA adapter {name!r}: no lora_A/lora_B for {site.path}; not written by {SAVE}")
        A, B = params["lora_A"].float(), params["lora_B"].float()  # (r·n, d_in), (d_out·n, r)
        if site.part is not None:  # grouped over the enabled q, k, v slices of a fused projection
            g = enabled.index(site.role)
            A, B = A[g * r : (g + 1) * r], B[g * site.width : (g + 1) * site.width]
        if A.shape != (r, site.d_in) or B.shape != (site.width, r):
            raise SurgeryError(
                f"LoRA at {site.path}: A {tuple(A.shape)}, B {tuple(B.shape)}, the base's is {site.d_in} -> "
                f"{site.width} at r {r}; wrong --base?"
            )
        pairs[adapter_target(site)] = (A.T.contiguous(), B.T.contiguous())
        used.add(site.path)
    extra = sorted(set(by_module) - used)
    if extra:
        raise SurgeryError(f"LoRA adapter {name!r} has tensors at {extra[0]}, where its config puts no LoRA")
    spec = LoraSpec(dict.fromkeys(roles, r), alpha)
    report = insert_adapters(gm, sites, spec)
    set_lora(gm, pairs)
    return spec, report, f"LoRA beside {', '.join(roles)} with alpha {alpha:g} (scaling alpha/r as in adapters)"
