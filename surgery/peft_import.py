"""PEFT LoRA folders as adapted models: `adapter_config.json` + `adapter_model.safetensors` onto a captured base.

An older folder's `adapter_model.bin` (a torch.save pickle) is read with `torch.load(weights_only=True)`, torch's
restricted unpickler: tensors only, never code; anything else in it is refused.

PEFT computes `y + (lora_alpha/r)·B(A(x))` with `A.weight` (r, d_in) and `B.weight` (d_out, r), whatever
the base layer (an `nn.Linear`, or GPT-2's Conv1D with `fan_in_fan_out`, which only changes how PEFT merges).
Here each adapted module becomes one LoRA site over its whole output, named by module path (`role` is the
path, so a `rank_pattern` is just a rank per site), with `lora_A = scale·Aᵀ` and `lora_B = Bᵀ`: the scale
(`alpha_pattern` or `lora_alpha`, over r or √r with rsLoRA) is folded into A and the spec's scaling is 1.
Which modules carry LoRA, and their ranks, are read from the tensors themselves.

Not supported, and refused by name: other PEFT methods, DoRA, LoRA on embeddings or convolutions,
trainable biases (`bias` other than "none"), `modules_to_save`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from surgery.adapters import LoraSpec
from surgery.bundle import Peft
from surgery.capture import Captured
from surgery.errors import SurgeryError
from surgery.graph import adapter_target, set_lora
from surgery.insert import InsertReport, insert_adapters
from runtime.files import check_safetensors, read_config
from surgery.sites import Site, _layer_index, _site, input_node, linear_modules

PREFIX = "base_model.model."
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # in order of preference


def adapter_files(folder: Path, weight_files: tuple[str, ...], refusal: str) -> tuple[Path, Path]:
    """A saved adapter folder's `adapter_config.json` and the first of `weight_files` it holds (PEFT and AdapterHub
    write the same layout); a SurgeryError naming the folder and `refusal` when either is missing."""
    config_path = folder / "adapter_config.json"
    weights_path = next((p for p in (folder / n for n in weight_files) if p.is_file()), None)
    if not config_path.is_file() or weights_path is None:
        raise SurgeryError(f"{folder}: {refusal}")
    return config_path, weights_path


def read_peft(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter config and tensors of a PEFT folder, after refusing what this tool does not support."""
    folder = Path(folder)
    config_path, weights_path = adapter_files(
        folder,
        WEIGHT_FILES,
        "not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors); "
        "save it with peft_model.save_pretrained(folder)",
    )
    config = read_config(config_path, str(folder))
    kind = config.get("peft_type")
    if kind != "LORA":
        raise SurgeryError(f"{folder}: PEFT method {kind} is not supported; only LoRA (peft_type LORA) imports")
    if config.get("use_dora"):
        raise SurgeryError(
            f"{folder}: DoRA (use_dora) is not supported: its magnitude vector rescales the weight; train a plain LoRA"
        )
    if config.get("bias", "none") != "none":
        raise SurgeryError(
            f"{folder}: bias={config['bias']!r} trains base biases, which this import does not carry; use bias='none'"
        )
    if config.get("modules_to_save"):
        raise SurgeryError(
            f"{folder}: modules_to_save ({', '.join(config['modules_to_save'])}) are full copies of base modules; "
            "not supported, save the adapter without them"
        )
    tensors = read_tensors(weights_path)
    odd = [k for k in tensors if not re.search(r"\.lora_[AB]\.weight$", k)]
    if odd:
        raise SurgeryError(f"{folder}: tensors other than LoRA A/B on linear layers ({odd[0]}, ...) are not supported")
    return config, tensors


def read_tensors(path: Path, save: str = "peft_model.save_pretrained(folder)") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a torch.save .bin through torch's restricted unpickler;
    `save` says how to write the adapter again."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_safetensors(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SurgeryError(
                f"{path}: not a readable safetensors file ({exc}); save the adapter again: {save}"
            ) from exc
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler raises UnpicklingError; a damaged file anything
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SurgeryError(
            f"{path}: refused, it is a pickle that holds more than tensors ({reason}); loading it would run code. "
            f"Save the adapter as safetensors ({save})"
        ) from exc
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise SurgeryError(
            f"{path}: holds a {type(tensors).__name__}, not a dict of tensors; save the adapter again: {save}"
        )
    return tensors


def resolve(path: str, known: set[str], what: str = "PEFT") -> str:
    """PEFT's module path in our graph: as is, or without the task head's wrapper (`transformer.`, `bert.`, ...)."""
    parts = path.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in known:
            return candidate
    raise SurgeryError(
        f"{what} adapts module {path}, which the base model's graph does not have; "
        "is --base the model it was trained on?"
    )


def _pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def import_peft(captured: Captured, folder: str | Path) -> tuple[LoraSpec, InsertReport, Peft]:
    """Insert a PEFT LoRA folder's adapters into a captured base model (in place)."""
    if captured.manifest is not None:
        raise SurgeryError(f"{captured.source.name} is already adapted; import PEFT adapters into its base model")
    config, tensors = read_peft(folder)
    gm = captured.gm
    known = set(linear_modules(gm))

    def natural(path: str) -> list[Any]:  # h.2 before h.10
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in path.split(".")]

    peft_paths = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in tensors}, key=natural)
    sites, pairs = [], {}
    for peft_path in peft_paths:
        path = resolve(peft_path, known)
        A = tensors[f"{PREFIX}{peft_path}.lora_A.weight"]  # (r, d_in)
        B = tensors[f"{PREFIX}{peft_path}.lora_B.weight"]  # (d_out, r)
        r = A.shape[0]
        alpha = float(_pattern(config.get("alpha_pattern") or {}, peft_path, config.get("lora_alpha", 8)))
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        out = _site(gm, path, _layer_index(path), path)
        x = input_node(gm, path)
        d_in = int(x.meta["val"].shape[-1])
        if (A.shape[1], B.shape[0]) != (d_in, out.width):
            raise SurgeryError(
                f"PEFT's {peft_path} is {A.shape[1]} -> {B.shape[0]}, the base's {path} {d_in} -> {out.width}; "
                "wrong --base?"
            )
        site = Site(path, out.layer, path, out.width, out.node, x.name, path, d_in)
        sites.append(site)
        pairs[adapter_target(site)] = (scale * A.T, B.T)
    spec = LoraSpec({s.role: int(pairs[adapter_target(s)][0].shape[1]) for s in sites})  # alpha = r: scaling 1
    report = insert_adapters(gm, sites, spec)
    set_lora(gm, pairs)
    keys = (
        "r",
        "lora_alpha",
        "target_modules",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "base_model_name_or_path",
    )
    keep = {k: config.get(k) for k in keys}
    return spec, report, Peft(str(folder), keep, "scale folded into lora_A; spec scaling 1")
