"""The adapter's cost on ONNX Runtime CPU, form by form, at 1, 2 and 4 threads.

    python -m benchmarks.cpu_overhead [--threads 1,2,4] [--runs 300] [-o benchmarks/results/cpu_overhead]

The pretrained MiniLM and Houlsby r=8 on it (12 bottlenecks, relu, distinct random stand-in weights), batch 1 x
sequence 128. Every file comes from the tool's own exporters, each checked against torch when written:
- `base`: `surgery export minilm`;
- `houlsby`: the baked export as `surgery export` writes it (the fused form, surgery/fuse.py: up-bias folded into
  the projection, the up-projection a MatMul and the Add of the residual);
- `houlsby-folded`: each down-projection folded into the projection before it (surgery/fold.py: one GEMM over
  `[W | W·W_down]`, its two parts taken by Slice; the skinny down-GEMM is gone);
- `swappable+pack`: the swappable export with the model's own pack active;
- `swappable-slots`: the swappable export with no pack, through its rank-0 slots (what a session ran before);
- `swappable`: the same with no pack through `AdaptedSession`, which takes the base graph cut out of the export.
All of them run in one process, call by call in turn (spinning off: DESIGN.md), after warm-up; each overhead is the
median of the paired per-call ratios against `base`, with a 95% t-interval on them (`benchmarks/timing.py`).
Beside each form, the op counts of the graph ONNX Runtime runs after its optimizations (level 99, written through
`optimized_model_filepath`): that the forms survive the optimizer is part of the result.
Writes cpu_overhead.json and cpu_overhead.md into --output.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import machine, time_interleaved
from exporters.onnx import export_onnx
from exporters.runtime import AdaptedSession
from exporters.swappable import export_swappable
from exporters.verify import ort_session
from surgery.adapters import AdapterSpec
from surgery.fold import folded_copy
from surgery.packs import pack_from_model, save_pack
from surgery.pipeline import open_model, stand_in_adapted
from benchmarks.args import add_output

COUNTED = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Add", "Relu", "Slice", "Split", "SkipLayerNormalization")


def prepare(work: Path) -> dict[str, Any]:
    """Export every form once; returns the files, the pack and each export's parity."""
    base = open_model("minilm")
    adapted = stand_in_adapted(base, AdapterSpec("houlsby", r=8), work / "houlsby.adapted.pt2", seed=0, weights_seed=7)
    exports = {
        "base": export_onnx(base.gm, base.signature, work / "base.onnx"),
        "houlsby": export_onnx(adapted.gm, adapted.signature, work / "houlsby.onnx", manifest=adapted.manifest),
    }
    folded = folded_copy(adapted.gm, adapted.manifest)
    exports["houlsby-folded"] = export_onnx(folded, adapted.signature, work / "folded.onnx", fuse=False)
    swappable = export_swappable(adapted, work / "swappable.onnx")
    pack = save_pack(pack_from_model(adapted.gm.state_dict(), adapted.manifest), work / "own.onnx_adapter")
    parity = {k: e.parity.max_abs_diff for k, e in exports.items()}
    parity["swappable"] = max(swappable.base_parity.max_abs_diff, swappable.pack_parity.max_abs_diff)
    return {
        "files": {k: e.path for k, e in exports.items()},
        "swappable": swappable.path,
        "pack": pack,
        "parity": parity,
    }


def optimized_ops(path: Path, work: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs for `path` after its level-99 optimizations."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(work / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return {op: counts[op] for op in COUNTED if counts[op]}


def time_forms(prepared: dict[str, Any], threads: int, runs: int, seq: int) -> list[dict[str, Any]]:
    feeds = {
        "input_ids": np.random.default_rng(0).integers(0, 30000, (1, seq), dtype=np.int64),
        "attention_mask": np.ones((1, seq), dtype=np.int64),
    }
    calls = {}
    for name, path in prepared["files"].items():
        session = ort_session(path, threads=threads, spinning=False)
        calls[name] = lambda s=session: s.run(None, feeds)
    adapted = AdaptedSession(prepared["swappable"], threads=threads, spinning=False)
    adapted.load("own", prepared["pack"])
    calls["swappable+pack"] = lambda: adapted.run(feeds, adapter="own")
    calls["swappable-slots"] = lambda: adapted.session.run(None, feeds)
    calls["swappable"] = lambda: adapted.run(feeds)
    return [t.to_json() for t in time_interleaved(calls, runs=runs, warmup=20)]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Adapter overhead on ONNX Runtime CPU, by form",
        "",
        f"MiniLM, Houlsby r=8, batch 1 x seq {result['seq']}; {result['runs']} alternated calls per form after "
        f"20 warm-up rounds, one process, spinning off. {m['cpu']}, {m['cores']} cores, onnxruntime "
        f"{m['onnxruntime']}. Overhead: median of paired per-call ratios to base [95% interval].",
        "",
        "| threads | form | median ms | overhead [95% CI] |",
        "|---|---|---|---|",
    ]
    for threads, rows in result["timings"].items():
        for row in rows:
            ci = row["interval"]
            over = "" if ci is None else f"{row['ratio_to_first'] - 1:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}]"
            lines.append(f"| {threads} | {row['name']} | {row['median_ms']:.2f} | {over} |")
    lines += ["", "Ops ONNX Runtime runs after its optimizations (level 99):", ""]
    lines += [f"- {name}: {', '.join(f'{k} {v}' for k, v in ops.items())}" for name, ops in result["ops"].items()]
    lines += [
        "",
        "Max abs difference against torch at export: " + ", ".join(f"{k} {v:.1e}" for k, v in result["parity"].items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seq", type=int, default=128)
    add_output(parser, Path("out/cpu_overhead"), type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cpu-overhead-"))
    prepared = prepare(work)
    ops = {name: optimized_ops(path, work) for name, path in prepared["files"].items()}
    ops["swappable"] = optimized_ops(prepared["swappable"], work)
    timings = {}
    for threads in (int(t) for t in args.threads.split(",")):
        timings[threads] = time_forms(prepared, threads, args.runs, args.seq)
        print(json.dumps({"threads": threads, "timings": timings[threads]}), flush=True)
    result = {
        "machine": machine(),
        "seq": args.seq,
        "runs": args.runs,
        "parity": prepared["parity"],
        "ops": ops,
        "timings": timings,
    }
    (args.out / "cpu_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "cpu_overhead.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
