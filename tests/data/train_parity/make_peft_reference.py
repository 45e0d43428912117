"""Make the PEFT reference of `surgery train`'s LoRA parity test (tests/surgery/test_train_parity.py), once.

    python tests/data/train_parity/make_peft_reference.py      (from the repository root; peft in the venv)

Writes, beside this script:
- `llama-tiny/`: a tiny random Llama (width 32, 2 layers, GQA), its weights and a word-level tokenizer;
- `data.jsonl`: 100 prompt/response rows (tests/surgery/train_fixtures.py);
- `peft-lora.initial.safetensors`: the LoRA weights `surgery insert --method lora --r 4` (seed 0) starts from, named
  as in the adapted graph (`lora_A` (d_in, r), `lora_B` (r, d_out));
- `peft-lora.json`: the settings, versions, PEFT's per-step losses and, per tensor, the reference's own spread (the
  relative Frobenius distance between its runs on 1 and 2 threads);
- `peft-lora.final.safetensors`: PEFT's final LoRA weights (the 1-thread run), named and laid out as above.

The PEFT run is a plain torch loop over `get_peft_model(LlamaForCausalLM)` with what `surgery train` does:
same initial LoRA weights (A = lora_Aᵀ, B = lora_Bᵀ, alpha = r: scale 1), targets q_proj and v_proj, no dropout,
fp32 on the CPU; the data order `torch.randperm(rows, generator seeded seed·100003 + epoch)`, batches of 4 padded on
the right (labels -100 on the prompt and the padding; transformers' own shifted mean cross-entropy); AdamW
(lr 5e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every LoRA matrix: none is a bias or a norm);
linear warmup over int(0.1·steps) steps then linear decay to 0 (transformers' get_linear_schedule_with_warmup);
the gradients' global norm clipped to 1.0; 2 epochs of 25 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from tests.surgery.train_fixtures import write_data, write_tokenizer  # noqa: E402

SETTINGS = dict(r=4, epochs=2, batch_size=4, lr=5e-3, weight_decay=0.01, warmup=0.1, max_grad_norm=1.0, seed=0)
ROWS = 100


def make_base(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, vocab_size=48, max_position_embeddings=64, initializer_range=0.2,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    write_tokenizer(folder, lm=True)


def initial_lora(folder: Path) -> dict[str, torch.Tensor]:
    from surgery.adapters import parse_spec
    from surgery.pipeline import adapt, open_model

    captured = open_model(str(folder))
    adapt(captured, parse_spec("lora", str(SETTINGS["r"])), seed=0)
    return {n: p.detach().clone() for n, p in captured.gm.named_parameters() if n.startswith("adapters.")}


def encode(folder: Path, data: Path) -> list[tuple[list[int], list[int]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    out = []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        text = tok(row["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((prompt + text, [-100] * len(prompt) + text))
    return out


def peft_run(folder: Path, initial: dict[str, torch.Tensor], examples, threads: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, get_linear_schedule_with_warmup

    torch.set_num_threads(threads)
    torch.manual_seed(SETTINGS["seed"])
    base = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    config = LoraConfig(
        r=SETTINGS["r"], lora_alpha=SETTINGS["r"], lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(base, config)
    names = {}  # surgery name -> PEFT parameter
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in initial.items():
            path, kind = name.removeprefix("adapters.").rsplit(".", 1)  # model.layers.0.self_attn.q_proj, lora_A
            p = params[f"base_model.model.{path}.{kind}.default.weight"]
            p.copy_(t.T)
            names[name] = p
    model.train()  # dropout everywhere is 0: the base config's and the LoRA's
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(names)
    optimizer = torch.optim.AdamW(trainable, lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
    n, bs = len(examples), SETTINGS["batch_size"]
    steps = SETTINGS["epochs"] * -(-n // bs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(SETTINGS["warmup"] * steps), steps)
    pad = 0
    losses = []
    for epoch in range(SETTINGS["epochs"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SETTINGS["seed"] * 100_003 + epoch))
        for start in range(0, n, bs):
            batch = [examples[i] for i in order[start : start + bs].tolist()]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, SETTINGS["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    return losses, {name: p.detach().T.contiguous().clone() for name, p in names.items()}


def main() -> None:
    import peft
    import transformers
    from safetensors.torch import save_file

    folder = HERE / "llama-tiny"
    make_base(folder)
    data = write_data("causal-lm", HERE / "data.jsonl", rows=ROWS)
    initial = initial_lora(folder)
    save_file({k: v.contiguous() for k, v in initial.items()}, HERE / "peft-lora.initial.safetensors")
    examples = encode(folder, data)
    losses, final = peft_run(folder, initial, examples, threads=1)
    losses_2, final_2 = peft_run(folder, initial, examples, threads=2)
    spread = {k: float((final[k] - final_2[k]).norm() / final[k].norm()) for k in final}
    save_file(final, HERE / "peft-lora.final.safetensors")
    record = {
        "settings": SETTINGS,
        "rows": ROWS,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "losses": losses,
        "losses_2_threads": losses_2,
        "spread": spread,
    }
    (HERE / "peft-lora.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; spread max {max(spread.values()):.2e}")


if __name__ == "__main__":
    main()
