"""Merged LoRA costs nothing: ONNX Runtime latency of base, LoRA (unmerged) and merged-LoRA MiniLM.

    python -m benchmarks.merge --r 8 --targets q,v --runs 200 -o merge.json

LoRA goes into the pretrained MiniLM, its B gets small random weights (standing in for trained ones, so the
merge has something to fold), and the model is exported twice: as is, and after `merge_adapters`. Each export
is checked against torch; the three models are then timed alternately, call by call (benchmarks.latency),
at batch 1, sequence 128. Prints the machine, versions and settings beside the numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

from benchmarks.timing import alternate, machine
from exporters.onnx import export_onnx
from surgery.adapters import LoraSpec, stand_in_weights
from surgery.pipeline import adapt, merge_model, open_model
from benchmarks.args import add_output


def run(r: str, targets: str, runs: int, threads: int, seq: int) -> dict:
    base = open_model("minilm")
    lora = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    report = adapt(lora, LoraSpec.parse(r, targets))
    stand_in_weights(lora.gm, seed=1)
    folder = Path(tempfile.mkdtemp(prefix="merge-bench-"))
    exports = {"lora_unmerged": export_onnx(lora.gm, lora.signature, folder / "lora.onnx")}
    merged, _ = merge_model(lora, report.sites)
    exports["lora_merged"] = export_onnx(lora.gm, lora.signature, folder / "merged.onnx")
    exports = {"base": export_onnx(base.gm, base.signature, folder / "base.onnx"), **exports}
    feeds = {
        "input_ids": np.random.default_rng(0).integers(0, 30000, (1, seq), dtype=np.int64),
        "attention_mask": np.ones((1, seq), dtype=np.int64),
    }
    timings = alternate({k: e.path for k, e in exports.items()}, feeds, runs=runs, threads=threads)
    return {
        "machine": machine(),
        "settings": {"r": r, "targets": targets, "batch": 1, "seq": seq, "runs": runs, "threads": threads},
        "merge": merged.to_json(),
        "onnx_nodes": {k: len(onnx.load(str(e.path)).graph.node) for k, e in exports.items()},
        "onnx_max_abs_diff": {k: e.parity.max_abs_diff for k, e in exports.items()},
        "latency": [t.to_json() for t in timings],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", default="8", help="LoRA rank, or per projection: q=8,v=8")
    parser.add_argument("--targets", default=None, help="projections (default q,v)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    add_output(parser, None, "write the JSON here too", type=Path)
    args = parser.parse_args()
    result = run(args.r, args.targets, args.runs, args.threads, args.seq)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
