"""LoRA adapted models as PEFT folders (`surgery export-peft`): what `PeftModel.from_pretrained(base, folder)` loads.

The inverse of peft_import.py. A LoRA site over a whole projection (`lora_A` (d_in, r), `lora_B` (r, d_out),
scaling alpha/r) becomes PEFT's `lora_A.weight` = Aᵀ and `lora_B.weight` = Bᵀ with the same r and alpha (per
module through `rank_pattern` / `alpha_pattern` where they differ). Several LoRAs on slices of one fused
projection (GPT-2's c_attn: q and v) become one LoRA over the whole projection, as PEFT has it: the ranks
concatenated, A stacked with each slice's scaling folded in, B block-diagonal into the slices' output columns,
alpha = r (scaling 1). GPT-2's Conv1D sets `fan_in_fan_out`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from surgery.adapters import LoraSpec
from surgery.errors import SurgeryError
from surgery.graph import adapter_target
from surgery.peft_import import PREFIX
from surgery.sites import Site

CONV1D_FAMILIES = ("gpt2",)  # projections stored (d_in, d_out): PEFT's fan_in_fan_out


@dataclass(frozen=True)
class PeftFolder:
    """What `write_peft` writes: the adapter config and the tensors by PEFT's names."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def peft_folder(gm: fx.GraphModule, spec: LoraSpec, sites: list[Site], model_type: str | None, base: str) -> PeftFolder:
    """The PEFT form of the LoRA adapters at `sites` of `gm` (lifted: one module per site)."""
    if not isinstance(spec, LoraSpec):
        raise SurgeryError(
            f"export-peft writes LoRA adapters; this model's are {spec.method}: PEFT has no bottleneck adapters"
        )
    by_module: dict[str, list[Site]] = {}
    for site in sites:
        by_module.setdefault(site.path, []).append(site)
    tensors, ranks, alphas = {}, {}, {}
    for path, group in by_module.items():
        loras = [(site, gm.get_submodule(adapter_target(site))) for site in group]
        if len(group) == 1 and group[0].part is None:
            lora = loras[0][1]
            A, B = lora.lora_A.detach().T, lora.lora_B.detach().T  # (r, d_in), (d_out, r)
            alphas[path] = float(lora.alpha)
        else:  # slices of a fused projection: one LoRA of the summed rank, block-diagonal B, scaling folded into A
            out_features = loras[0][1].out_features
            rank = sum(lora.lora_A.shape[1] for _, lora in loras)
            A = torch.cat([(lora.scale * lora.lora_A.detach()).T for _, lora in loras])  # (R, d_in)
            B = torch.zeros(out_features, rank, dtype=A.dtype)  # (d_out, R)
            col = 0
            for _, lora in loras:
                r, d = lora.lora_B.shape
                B[lora.start : lora.start + d, col : col + r] = lora.lora_B.detach().T
                col += r
            alphas[path] = float(rank)
        ranks[path] = int(A.shape[0])
        tensors[f"{PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = B.contiguous()
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(by_module),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
        "fan_in_fan_out": model_type in CONV1D_FAMILIES,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return PeftFolder(config, tensors)


def write_peft(result: PeftFolder, folder: str | Path) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` into a new folder, both or neither."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SurgeryError(f"output {folder} exists and is not an empty folder; choose another -o")
    if not folder.parent.is_dir():
        raise SurgeryError(f"output {folder}: folder {folder.parent} does not exist; create it or choose another -o")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        (tmp / "adapter_config.json").write_text(json.dumps(result.config, indent=2) + "\n")
        save_file({k: v.float() for k, v in result.tensors.items()}, str(tmp / "adapter_model.safetensors"))
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
