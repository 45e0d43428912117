"""The main job on the embedded default model (`make demo`, `surgery demo`).

Houlsby r=8 into the pretrained MiniLM, saved as an adapted .pt2, both base and adapted exported to
ONNX and verified against torch, then timed in ONNX Runtime at batch 1, sequence 128. The adapter's
up-projection starts at zero (the adapted model is the base model); for a parity check that means
something, the exported adapter is given small random weights first, standing in for trained ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from benchmarks.timing import Timing, alternate, machine
from exporters.onnx import OnnxExport, export_onnx
from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.bundle import save_adapted
from surgery.insert import InsertReport, houlsby_params
from surgery.pipeline import adapt, open_model

Step = Callable[[str], AbstractContextManager[Any]]


@dataclass
class DemoResult:
    r: int
    layers: int
    d_model: int
    report: InsertReport
    formula: int
    adapted_pt2: Path
    base: OnnxExport
    adapted: OnnxExport
    timings: list[Timing]
    batch: int
    seq: int
    threads: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": "minilm",
            "method": "houlsby",
            "r": self.r,
            "layers": self.layers,
            "d_model": self.d_model,
            "sites": [s.path for s in self.report.sites],
            "trainable_params": self.report.trainable,
            "seed_formula_params": self.formula,
            "total_params": self.report.total,
            "adapted_pt2": str(self.adapted_pt2),
            "base_onnx": self.base.to_json(),
            "adapted_onnx": self.adapted.to_json(),
            "latency": {
                "batch": self.batch,
                "seq": self.seq,
                "threads": self.threads,
                "machine": machine(),
                "results": [t.to_json() for t in self.timings],
            },
        }

    def rows(self) -> list[tuple[str, str]]:
        base, adapted = self.timings
        share = 100 * self.report.trainable / self.report.total
        return [
            ("sites", f"{len(self.report.sites)} ({self.layers} layers x attn_out, ffn_out)"),
            ("trainable parameters", f"{self.report.trainable:,} ({share:.2f}% of {self.report.total:,})"),
            (
                "seed formula 2L(2dr+d+r)",
                f"{self.formula:,} (L={self.layers}, d={self.d_model}, r={self.r}): "
                + ("equal" if self.formula == self.report.trainable else "DIFFERENT"),
            ),
            ("ONNX parity, base", _parity(self.base)),
            ("ONNX parity, adapted (random adapter weights)", _parity(self.adapted)),
            (
                f"ORT latency base, b{self.batch} s{self.seq}, {self.threads} threads",
                f"{base.median_ms:.2f} ms (p10-p90 {base.p10_ms:.2f}-{base.p90_ms:.2f})",
            ),
            (
                f"ORT latency adapted, b{self.batch} s{self.seq}, {self.threads} threads",
                f"{adapted.median_ms:.2f} ms (p10-p90 {adapted.p10_ms:.2f}-{adapted.p90_ms:.2f})",
            ),
            ("adapter overhead (median of paired ratios)", f"{100 * (adapted.ratio_to_first - 1):+.1f}%"),
        ]

    def markdown(self) -> str:
        lines = ["# surgery demo: Houlsby r=%d in pretrained MiniLM" % self.r, "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.rows()]
        m = machine()
        lines += [
            "",
            f"Machine: {m['cpu']}, Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
            f"{self.timings[0].runs} alternated runs per model after warm-up.",
        ]
        return "\n".join(lines) + "\n"


def _parity(e: OnnxExport) -> str:
    p = e.parity
    return f"max |ORT - torch| {p.max_abs_diff:.2e} <= {p.tolerance:g} on {len(p.shapes)} padded shapes"


def run_demo(out: Path, step: Step, r: int = 8, runs: int = 100, threads: int = 2) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    with step("load and capture pretrained MiniLM"):
        captured = open_model("minilm")
    with step("export base model to ONNX and verify"):
        base = export_onnx(captured.gm, captured.signature, out / "minilm.base.onnx")
    spec = AdapterSpec(method="houlsby", r=r)
    with step(f"insert Houlsby adapters, r={r}"):
        report = adapt(captured, spec)
    with step("save minilm.adapted.pt2"):
        save_adapted(out / "minilm.adapted.pt2", captured, spec, report)
    with step("export adapted model to ONNX and verify"):
        stand_in_weights(captured.gm, seed=1, std=0.02)
        adapted = export_onnx(captured.gm, captured.signature, out / "minilm.adapted.onnx")
    batch, seq = 1, 128
    feeds = {
        n: t.numpy()
        for n, t in zip(captured.signature.names, captured.signature.examples({"batch": batch, "seq": seq}))
    }
    with step(f"time base and adapted in ONNX Runtime ({runs} alternated runs each)"):
        timings = alternate({"base": base.path, "adapted": adapted.path}, feeds, runs=runs, threads=threads)
    layers = len({s.layer for s in report.sites})
    d_model = report.sites[0].width
    result = DemoResult(
        r,
        layers,
        d_model,
        report,
        houlsby_params(layers, d_model, r),
        out / "minilm.adapted.pt2",
        base,
        adapted,
        timings,
        batch,
        seq,
        threads,
    )
    (out / "demo.md").write_text(result.markdown())
    (out / "demo.json").write_text(json.dumps(result.to_json(), indent=1))
    return result
