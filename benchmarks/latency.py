"""Latency of base and adapted variants: every (variant, backend) in its own process, interleaved, with warm-up.

    python -m benchmarks.latency --model minilm --grid 1x128,16x256 --backends torch,ort
    python -m benchmarks.latency --model gpt2-medium --grid paper --backends torch-cuda-graphs,torch-cuda-compile
    surgery bench minilm.adapted.pt2 --backends torch,ort --batch 1,16 --seq 128,256

The program prepares the artifacts once (`benchmarks/variants.py`: a .pt2 per variant for torch, an ONNX per
variant for ONNX Runtime, a pack for the swappable variant), then runs the harness (`benchmarks/harness.py`: one
worker process per case, `benchmarks/worker.py`) and writes results.md, results.json and results.png. ONNX Runtime
runs with spinning off (a waiting pool would steal the core from the next worker). Each overhead comes with a 95%
confidence interval from the paired per-round ratios; with `--target 3` each row also says met / missed / within
noise of ≤ 3%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness import BACKENDS, run_grid, write_reports
from benchmarks.worker import COMPILE_MODES
from benchmarks.args import add_output

GRIDS = {"tiny": [(1, 16)], "default": [(1, 128)], "paper": [(1, 128), (16, 256), (32, 512)]}


def parse_grid(text: str) -> list[tuple[int, int]]:
    """`paper`, `tiny`, `default`, or `1x128,16x256`."""
    if text in GRIDS:
        return GRIDS[text]
    try:
        return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]
    except ValueError as exc:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"--grid {text!r}: give {', '.join(GRIDS)} or BATCHxSEQ pairs, e.g. 1x128,16x256") from exc


def main(argv: list[str] | None = None) -> None:
    from benchmarks.variants import VARIANTS, prepare
    from surgery.quiet import quiet_libraries

    quiet_libraries()
    p = argparse.ArgumentParser(
        description="Latency of base and adapted variants, each in its own process, interleaved."
    )
    p.add_argument(
        "--model",
        default="minilm",
        help="minilm (pretrained), minilm-random or gpt2-medium (random weights), or a source path",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--backends", default="torch,ort", help=f"comma-separated, from: {', '.join(BACKENDS)}")
    p.add_argument("--grid", default="default", help="tiny, default (1x128), paper (1x128,16x256,32x512), or BxS,...")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=5, help="timed calls per worker per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=sorted(COMPILE_MODES),
        help="torch.compile modes of the *-compile backends: default (-graphs: reduce-overhead) or "
        "max-autotune (max-autotune-no-cudagraphs; -graphs: max-autotune)",
    )
    p.add_argument(
        "--build-timeout",
        type=float,
        help="seconds the workers get, together, to load and to build each shape's call (compile, capture); "
        "a case not ready by then is dropped with a message",
    )
    p.add_argument("--target", type=float, help="overhead target in percent: each row says met, missed or within noise")
    add_output(p, Path("out/bench"), type=Path)
    p.add_argument("--work", type=Path, help="where the exported variants go (default: OUT/artifacts)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    grid = parse_grid(a.grid)
    backends = a.backends.split(",")
    target = None if a.target is None else a.target / 100
    with console.status(f"exporting variants of {a.model} ..."):
        onnx = any(b.startswith("ort") for b in backends)
        artifacts = prepare(a.model, a.variants.split(","), a.work or a.out / "artifacts", r=a.r, onnx=onnx)
    with Progress(console=console) as progress:
        task = progress.add_task("timing", total=len(grid) * (a.rounds + 2))
        title = f"{a.model}: adapter latency, r={a.r}"
        rows = run_grid(
            a.model,
            artifacts,
            backends,
            grid,
            a.rounds,
            a.calls,
            2,
            a.threads,
            on_round=lambda: progress.advance(task),
            on_skip=lambda b, why: console.print(f"[yellow]skipping {b}: {why}[/]"),
            on_point=lambda done: write_reports(done, a.out, title, target),
            compile_mode=a.compile_mode,
            build_timeout=a.build_timeout,
        )
    paths = write_reports(rows, a.out, title, target)
    print(paths["md"].read_text())
    console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")


if __name__ == "__main__":
    main()
