"""Where an ONNX model's time goes in ONNX Runtime (CPU): kernel time per operator type.

    python -m benchmarks.profile_ort MODEL.onnx [MODEL2.onnx ...] [--batch 1 --seq 128 --runs 30]
    python -m benchmarks.profile_ort LM.onnx LM2.onnx --past 40     # one decode step of a causal LM with its cache

Runs each model with ORT's profiler on, after warm-up, and sums kernel time per op type over the
profiled runs (per run, in ms). Printed side by side for several models, so that what an adapter adds
(extra MatMul, Add, activation kernels) or what a graph change removes stands out. The last row counts the kernels
one run launches. `--past P`: a causal LM exported with its KV cache runs one decode step (one new token per row, a
random cache of P positions), the step generation repeats per token.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def cache_feeds(
    session, batch: int, past: int, rng: np.random.Generator, head_dim: int | None = None
) -> dict[str, np.ndarray]:
    """One decode step's inputs for a causal LM with its cache: a token per row after `past` cached positions.
    `head_dim` where the model leaves it symbolic (onnxruntime-genai's builder models: `kv_cache_dim`)."""
    feeds = {
        "input_ids": rng.integers(0, 1000, (batch, 1)),
        "attention_mask": np.ones((batch, past + 1), np.int64),
        "position_ids": np.full((batch, 1), past, np.int64),
    }
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            if not isinstance(dim, int):
                if head_dim is None:
                    raise SystemExit(f"{i.name}: its head size is symbolic ({dim!r}); give --head-dim")
                dim = head_dim
            feeds[i.name] = rng.standard_normal((batch, heads, past, dim)).astype(np.float32)
    return feeds


def profile(
    path: str,
    feeds: dict[str, np.ndarray],
    runs: int,
    threads: int,
    past: int | None = None,
    head_dim: int | None = None,
) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    if past is not None:
        feeds = cache_feeds(session, feeds["input_ids"].shape[0], past, np.random.default_rng(0), head_dim)
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
    kernels = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 3)  # µs -> ms per run
            kernels += 1
    return dict(per_op), kernels / (runs + 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--past", type=int, help="a causal LM with its cache: one decode step after this many positions")
    p.add_argument("--head-dim", type=int, help="with --past, where the cache inputs leave the head size symbolic")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 1000, (a.batch, a.seq)),
        "attention_mask": np.ones((a.batch, a.seq), np.int64),
    }
    profiled = {
        str(Path(m).relative_to(Path(m).parent.parent)): profile(m, feeds, a.runs, a.threads, a.past, a.head_dim)
        for m in a.models
    }
    results = {n: r[0] for n, r in profiled.items()}
    ops = sorted(
        {op for r in results.values() for op in r}, key=lambda op: -max(r.get(op, 0) for r in results.values())
    )
    names = list(results)
    print("| op type | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{results[n].get(op, 0):.3f}" for n in names) + " |")
    print("| **total kernel ms** | " + " | ".join(f"**{sum(results[n].values()):.3f}**" for n in names) + " |")
    print("| kernels per run | " + " | ".join(f"{profiled[n][1]:.0f}" for n in names) + " |")


if __name__ == "__main__":
    main()
