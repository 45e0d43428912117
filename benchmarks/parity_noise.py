"""How far a correct fp32 export is from torch, against torch's own noise, and how far a corrupted one is: the
measurement behind `surgery/parity.py`'s NOISE_K.

    python -m benchmarks.parity_noise smollm2-135m:causal-lm gemma3-270m mpnet -o benchmarks/results/parity_noise.json

Each model (a real checkpoint name of surgery/zoo.py or a model path, `:task` to choose the task) is adapted with
Houlsby r=8 (distinct random weights, std 0.05), exported baked, and run in ONNX Runtime (CPU, 2 threads) on the
parity check's padded batches. Per output: ONNX Runtime's difference from torch fp32, and torch's own noise measured
two ways (fp32 against float64; 2 threads against 1). `k needed` is the largest difference / floor over the outputs
past atol: the smallest NOISE_K that passes the export (for a corruption: the largest that still refuses it). The
corruptions scale one base weight matrix by 1.01 in the reference (the first, a middle and the last block's among the
value, output and feed-forward projections: a query or key projection under a norm is scale-invariant).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import machine
from exporters.onnx import export_onnx
from exporters.verify import feeds
from runtime.session import ort_session
from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.parity import ATOL, NOISE_K, check_sizes, compare, mask_of, noise_of, outputs_of
from surgery.pipeline import adapt, open_model
from surgery.sites import ADAPTER_ROOT
from surgery.zoo import CHECKPOINTS, fetch


def k_needed(parity: Any) -> float:
    """The largest difference / floor over the outputs whose difference is past atol (0 where none is): the smallest
    k with which every output passes `k * floor`, atol aside."""
    worst = 0.0
    for d in parity.outputs.values():
        if d.max_abs > parity.atol:
            worst = max(worst, d.max_abs / d.floor if d.floor else float("inf"))
    return worst


# Matrices whose scale reaches the output: a query or key projection under a norm (Gemma 3's q_norm and k_norm) is
# scale-invariant, so scaling it changes nothing to find.
SCALED = ("v_proj", "o_proj", "down_proj", "up_proj", "value", "output.dense", "fc2", "out_proj", "c_proj")


def corrupted(gm: torch.fx.GraphModule) -> list[str]:
    """One 2-D base weight matrix each of the first, a middle and the last block (by parameter order), among those
    whose scale reaches the output."""
    names = [n for n, p in gm.named_parameters() if p.dim() == 2 and not n.startswith(ADAPTER_ROOT + ".")]
    blocks = [n for n in names if any(part.isdigit() for part in n.split("."))] or names
    blocks = [n for n in blocks if any(s in n for s in SCALED)] or blocks
    return list(dict.fromkeys([blocks[0], blocks[len(blocks) // 2], blocks[-1]]))


def measure(model: str) -> dict:
    name, _, task = model.partition(":")
    source = str(fetch(name)) if name in CHECKPOINTS else name
    captured = open_model(source, task=task or None)
    adapt(captured, AdapterSpec("houlsby", r=8))
    stand_in_weights(captured.gm, seed=1)
    gm, sig = captured.gm, captured.signature
    run = lambda m, ts: outputs_of(m, sig, ts)  # noqa: E731
    row: dict[str, Any] = {"task": captured.task, "shapes": {}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        start = time.perf_counter()
        export_onnx(gm, sig, path, tolerance=float("inf"), rtol=float("inf"))
        row["export_s"] = round(time.perf_counter() - start, 1)
        session = ort_session(path)
        names = [o.name for o in session.get_outputs()]
        for k, sizes in enumerate(check_sizes(sig)):
            tensors = sig.examples(sizes, seed=k + 1, pad=True)
            mask = mask_of(sig, tensors)
            got = session.run(None, feeds(session, sig, tensors))
            ref = outputs_of(gm, sig, tensors)
            f64, _ = noise_of(gm, run, tensors)
            thr, how = noise_of(gm, run, tensors, float64=False)
            by64 = compare(ref, got, names=names, mask=mask, noise=f64)
            bythr = compare(ref, got, names=names, mask=mask, noise=thr)
            shape: dict[str, Any] = {
                "ort_max_abs": by64.max_abs_diff,
                "ort_max_rel": by64.max_rel_diff,
                "floor_float64": max(d.floor or 0.0 for d in by64.outputs.values()),
                "floor_threads": max(d.floor or 0.0 for d in bythr.outputs.values()),
                "k_needed_float64": k_needed(by64),
                "k_needed_threads": k_needed(bythr),
                "threads": how,
                "corruptions": {},
            }
            for target in corrupted(gm):
                weight = gm.get_parameter(target)
                with torch.no_grad():
                    weight.mul_(1.01)
                try:
                    bad = outputs_of(gm, sig, tensors)
                    bad64, _ = noise_of(gm, run, tensors)
                finally:
                    with torch.no_grad():
                        weight.div_(1.01)
                p = compare(bad, got, names=names, mask=mask, noise=bad64)
                shape["corruptions"][target] = {"max_rel": p.max_rel_diff, "k_refusing_below": k_needed(p)}
            row["shapes"][json.dumps(sizes)] = shape
            print(model, sizes, json.dumps(shape), flush=True)
    return row


def markdown(result: dict) -> str:
    lines = [
        f"NOISE_K = {result['noise_k']:g}, atol {result['atol']:g}; torch {result['machine']['torch']}, "
        f"ONNX Runtime {result['machine']['onnxruntime']}, {result['machine']['cpu']}.",
        "",
        "| model | task | shape | ORT vs torch fp32: abs (rel) | torch fp32 vs float64 | torch 2 vs 1 thread "
        "| k needed (float64 floor / threads floor) | one matrix x1.01: k below which it is refused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, row in result["models"].items():
        for sizes, s in row["shapes"].items():
            bad = min(c["k_refusing_below"] for c in s["corruptions"].values())
            label = Path(model.split(":")[0]).name
            lines.append(
                f"| {label} | {row['task']} | {sizes} | {s['ort_max_abs']:.2e} ({s['ort_max_rel']:.1e}) "
                f"| {s['floor_float64']:.2e} | {s['floor_threads']:.2e} "
                f"| {s['k_needed_float64']:.2f} / {s['k_needed_threads']:.2f} | {bad:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="real checkpoint names (surgery/zoo.py) or model paths, NAME:TASK")
    parser.add_argument("-o", "--output", default="benchmarks/results/parity_noise.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {
        "machine": machine(),
        "noise_k": NOISE_K,
        "atol": ATOL,
        "models": {m: measure(m) for m in args.models},
    }
    out = Path(args.output)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
