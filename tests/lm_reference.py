"""The reference an exported causal LM is held to: the transformers model itself, with the adapters applied by
forward hooks on the HF modules (an implementation independent of the graph rewrite), and its `generate`.

Base weights come from the captured graph (its parameter names are the HF model's: tasks.CausalLMWithPast keeps
the HF module paths), the adapter tensors from the adapted graph's state dict, by site.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from surgery.adapters import AdapterSpec, LoraSpec
from surgery.capture import Captured

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda x: x}


def hf_model(config_path: Any, adapted: Captured, spec: Any = None, sites: Any = None) -> torch.nn.Module:
    """The HF causal LM of `config_path` (or a config object) with `adapted`'s weights, its adapters as hooks (none
    for a base model); `spec` and `sites` where `adapted` has no manifest (adapted in memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_path if hasattr(config_path, "model_type") else AutoConfig.from_pretrained(config_path)
    model = AutoModelForCausalLM.from_config(config).eval()
    state = adapted.gm.state_dict()
    base = {k: v for k, v in state.items() if not k.startswith(("adapters.", "lifted_tensor"))}
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k or "inv_freq" in k or k == "lm_head.weight" for k in missing), missing
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if adapted.manifest is not None:
        spec, sites = adapted.manifest.adapter, adapted.manifest.sites
    for site in sites or ():
        p = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith(f"adapters.{site.path}.")}
        module = model.get_submodule(site.path)
        if isinstance(spec, LoraSpec):
            assert site.part is None, "fused projections: not in this reference"
            scale = spec.alpha_for(site.role) / p["lora_A"].shape[1]
            module.register_forward_hook(lambda m, a, y, p=p, s=scale: y + s * (a[0] @ p["lora_A"]) @ p["lora_B"])
        else:
            assert isinstance(spec, AdapterSpec) and spec.method in ("houlsby", "pfeiffer")
            act = ACT[spec.activation]
            module.register_forward_hook(
                lambda m, a, y, p=p, act=act: y + act(y @ p["down_w"] + p["down_b"]) @ p["up_w"] + p["up_b"]
            )
    return model


def hf_generate(model: torch.nn.Module, prompt: list[int], new: int, stop: int | None = None) -> tuple[list, list]:
    """transformers' greedy `generate` with its cache: the new tokens and each step's logits (1, vocab)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), [t.numpy() for t in out.logits]


def until_near_tie(logits: list, margin: float) -> int:
    """How many greedy steps are decided beyond doubt: the steps up to and including the first whose top two logits
    (of the reference's `logits`, one (1, vocab) array a step) lie within `margin` of each other. Past a near tie two
    correct runners may pick different tokens, and their later steps see different contexts."""
    import numpy as np

    for step, row in enumerate(logits):
        top2 = np.sort(np.asarray(row, dtype=np.float64).ravel())[-2:]
        if top2[1] - top2[0] <= margin:
            return step + 1
    return len(logits)
