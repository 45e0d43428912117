"""Half-precision ONNX against torch: how far fp16 and bf16 exports are from torch at the same precision and from
fp32, on real checkpoints. The default tolerances of `export --dtype fp16|bf16` (surgery/parity.py) come from here.

    python -m benchmarks.precision smollm2-135m mpnet -o benchmarks/results/precision.json

Each checkpoint is adapted with LoRA r=8 (distinct random weights), exported baked in fp32, fp16 and bf16, and every
export is run in ONNX Runtime (CPU; a bf16 export as its fp32 copy, see exporters/verify.py) on the padded 3x37 and
1x128 batches of the parity check.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from exporters.onnx import export_onnx
from exporters.verify import check_onnx
from surgery.adapters import LoraSpec, stand_in_weights
from surgery.pipeline import adapt, open_model
from surgery.sites import ADAPTER_ROOT
from surgery.zoo import CHECKPOINTS, fetch
from benchmarks.args import add_output

DTYPES = ("fp32", "fp16", "bf16")


def measure(name: str) -> dict:
    source = str(fetch(name)) if name in CHECKPOINTS else name
    models = {}
    for dtype in DTYPES:
        captured = open_model(source, dtype=dtype)
        adapt(captured, LoraSpec.parse("8"))
        models[dtype] = captured
    fp32 = models["fp32"]
    stand_in_weights(fp32.gm, seed=1)
    adapters = {n: p for n, p in fp32.gm.named_parameters() if n.startswith(ADAPTER_ROOT + ".")}
    with torch.no_grad():  # the same adapter values in every dtype, rounded
        for captured in models.values():
            for n, p in captured.gm.named_parameters():
                if n in adapters:
                    p.copy_(adapters[n])
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for dtype, captured in models.items():
            start = time.perf_counter()
            path = Path(folder) / f"{dtype}.onnx"
            same = export_onnx(captured.gm, captured.signature, path, tolerance=float("inf"), rtol=float("inf")).parity
            seconds = time.perf_counter() - start
            against = check_onnx(path, fp32.gm, fp32.signature, tolerance=float("inf"), rtol=float("inf"))
            rows[dtype] = {
                "same_precision": {"max_abs": same.max_abs_diff, "rel": same.max_rel_diff},
                "against_fp32": {"max_abs": against.max_abs_diff, "rel": against.max_rel_diff},
                "seconds": round(seconds, 1),
            }
            print(name, dtype, json.dumps(rows[dtype]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="real checkpoint names (surgery/zoo.py) or model paths")
    add_output(parser, "benchmarks/results/precision.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "models": {m: measure(m) for m in args.models},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "| model | dtype | ORT vs torch, same dtype (rel of max\\|torch\\|) | ORT vs torch fp32 (rel) |",
        "|---|---|---|---|",
    ]
    for m, rows in result["models"].items():
        for dtype, r in rows.items():
            lines.append(
                f"| {m} | {dtype} | {r['same_precision']['max_abs']:.2e} ({r['same_precision']['rel']:.1e}) "
                f"| {r['against_fp32']['max_abs']:.2e} ({r['against_fp32']['rel']:.1e}) |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
