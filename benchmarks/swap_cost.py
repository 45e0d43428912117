"""What it costs to change the adapter of a live model, against exporting and loading a new baked one.

    python -m benchmarks.swap_cost [--runs 50] [-o out/swap_cost]

Three adapted MiniLM models (Houlsby r=8, distinct random weights) stand in for three tasks. Measured:
- pack load: reading and checking an `.onnx_adapter` and memory-mapping it into the live session;
- switch: a run with the adapter changed since the last call, against a run with the same adapter
  (interleaved, median of paired ratios): the cost of a swap on the serving path;
- export + load: a new baked ONNX for the next task (export, onnx.checker, parity check) and a new session;
- latency at batch 1, sequence 128: base, baked, swappable with no pack and with a pack, interleaved in one
  process with spinning off (DESIGN.md: two sessions alternated this way keep their ratios to about ±2%).
Writes JSON and Markdown beside the printed table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.args import add_output
from benchmarks.timing import machine, time_interleaved
from exporters.onnx import export_onnx
from exporters.runtime import AdaptedSession
from exporters.swappable import export_swappable
from exporters.verify import ort_session
from surgery.adapters import AdapterSpec
from surgery.packs import pack_from_model, save_pack
from surgery.pipeline import open_model, stand_in_adapted


def _task_models(folder: Path, count: int = 3, r: int = 8):
    base = open_model("minilm")
    return base, [
        stand_in_adapted(base, AdapterSpec(r=r), folder / f"task{seed}.adapted.pt2", seed) for seed in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    add_output(parser, Path("out/swap_cost"), type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="swap-cost-"))
    base, models = _task_models(work)
    packs = [
        save_pack(pack_from_model(m.gm.state_dict(), m.manifest), work / f"task{i}.onnx_adapter")
        for i, m in enumerate(models)
    ]
    export_swappable(models[0], work / "swappable.onnx")
    base_onnx = export_onnx(base.gm, base.signature, work / "base.onnx").path

    # export + load of a baked model for a new task, three times
    export_load = []
    for i, m in enumerate(models):
        t0 = time.perf_counter()
        baked = export_onnx(m.gm, m.signature, work / f"baked{i}.onnx", manifest=m.manifest).path
        ort_session(baked, threads=args.threads)
        export_load.append(time.perf_counter() - t0)

    session = AdaptedSession(work / "swappable.onnx", threads=args.threads, spinning=False)
    load_times = []
    for i, p in enumerate(packs):
        t0 = time.perf_counter()
        session.load(f"task{i}", p)
        load_times.append(time.perf_counter() - t0)

    sig = base.signature
    feeds = {n: t.numpy() for n, t in zip(sig.names, sig.examples({"batch": 1, "seq": 128}))}
    cycle = iter(range(10**9))
    switch = time_interleaved(
        {
            "same adapter": lambda: session.run(feeds, adapter="task0"),
            "switched adapter": lambda: session.run(feeds, adapter=f"task{next(cycle) % 3}"),
        },
        runs=args.runs,
    )
    baked_session = ort_session(work / "baked0.onnx", threads=args.threads, spinning=False)
    base_session = ort_session(base_onnx, threads=args.threads, spinning=False)
    latency = time_interleaved(
        {
            "base": lambda: base_session.run(None, feeds),
            "baked (task0)": lambda: baked_session.run(None, feeds),
            "swappable, no pack": lambda: session.run(feeds),
            "swappable, task0 pack": lambda: session.run(feeds, adapter="task0"),
        },
        runs=args.runs,
    )
    result = {
        "machine": machine(),
        "threads": args.threads,
        "runs": args.runs,
        "pack_load_ms": [round(t * 1e3, 2) for t in load_times],
        "export_and_load_s": [round(t, 2) for t in export_load],
        "switch": [t.to_json() for t in switch],
        "latency_b1_s128": [t.to_json() for t in latency],
    }
    pack_load = statistics.median(load_times)
    swap_extra_ms = switch[1].median_ms - switch[0].median_ms
    result["export_and_load_over_pack_load"] = round(statistics.median(export_load) / pack_load, 1)
    lines = [
        "# Adapter swap cost, MiniLM Houlsby r=8",
        "",
        "| what | time |",
        "|---|---|",
        f"| load a pack into the live session (median of 3) | {pack_load * 1e3:.1f} ms |",
        f"| run after switching adapter vs same adapter (b1 s128) | {switch[1].median_ms:.2f} "
        f"vs {switch[0].median_ms:.2f} ms "
        f"(ratio {switch[1].ratio_to_first:.3f}, {swap_extra_ms:+.2f} ms) |",
        f"| export + verify + load a new baked model (median of 3) | {statistics.median(export_load):.2f} s |",
        f"| ratio export-and-load / pack load | {result['export_and_load_over_pack_load']:,}x |",
        "",
        "| latency, b1 s128 | median ms | p10-p90 | vs base |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t.name} | {t.median_ms:.2f} | {t.p10_ms:.2f}-{t.p90_ms:.2f} | {100 * (t.ratio_to_first - 1):+.1f}% |"
        for t in latency
    ]
    m = result["machine"]
    lines += [
        "",
        f"{m['cpu']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, {args.threads} threads, "
        f"{args.runs} interleaved runs after 10 warm-up rounds.",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "swap_cost.md").write_text(text)
    (args.out / "swap_cost.json").write_text(json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
