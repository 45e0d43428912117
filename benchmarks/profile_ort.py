"""Where an ONNX model's time goes in ONNX Runtime (CPU): kernel time per operator type.

    python -m benchmarks.profile_ort MODEL.onnx [MODEL2.onnx ...] [--batch 1 --seq 128 --runs 30]

Runs each model with ORT's profiler on, after warm-up, and sums kernel time per op type over the
profiled runs (per run, in ms). Printed side by side for several models, so that what an adapter adds
(extra MatMul, Add, activation kernels) or what a graph change removes stands out.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def profile(path: str, feeds: dict[str, np.ndarray], runs: int, threads: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    inputs = {k: v for k, v in feeds.items() if k in wanted}
    for _ in range(5):
        session.run(None, inputs)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(path).with_suffix("")) + ".profile"
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(runs + 3):
        session.run(None, inputs)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 3)  # µs -> ms per run
    return dict(per_op)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 1000, (a.batch, a.seq)),
        "attention_mask": np.ones((a.batch, a.seq), np.int64),
    }
    results = {Path(m).name: profile(m, feeds, a.runs, a.threads) for m in a.models}
    ops = sorted(
        {op for r in results.values() for op in r}, key=lambda op: -max(r.get(op, 0) for r in results.values())
    )
    names = list(results)
    print("| op type | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{results[n].get(op, 0):.3f}" for n in names) + " |")
    print("| **total kernel ms** | " + " | ".join(f"**{sum(results[n].values()):.3f}**" for n in names) + " |")


if __name__ == "__main__":
    main()
