"""The Python-backend model's serving process (Triton's stub) before and after the torch-free model code: its peak
RSS and the time the server takes to be ready with it.

    python -m benchmarks.triton_runtime --before /tmp/before-tree [--kinds swappable,routed] [--repeats 3]

`--before` is a checkout of the tool from before the change (e.g. `git archive REV | tar -x -C DIR`); the after is
this checkout. Each side, in a subprocess with PYTHONPATH set to its tree, writes the same MiniLM export (Houlsby
r=8) as a Python-backend model with its own `write_python_model` and serves it with its own `start_server` (the
bundled tritonserver): `swappable` (one pack), `routed` (two adapters, one ONNX Runtime session). Then it reads:
- `ready_s`: from the start of `start_server` until the server reports the model ready;
- `stub_peak_rss_mib`: the stub process's peak resident set (VmHWM) after the load and one request;
- `stub_modules`: whether torch was imported in the stub (its /proc maps hold libtorch).
After one unrecorded run per side (which makes any environment a side caches), the sides alternate,
`--repeats` times each; the report gives medians and ranges. Writes triton_runtime.json and
triton_runtime.md under --output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.args import add_output

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
folder, kind = Path(sys.argv[1]), sys.argv[2]
from exporters.triton import write_python_model
from exporters.triton_server import start_server
from surgery.packs import load_pack
from surgery.pipeline import open_model
base = open_model("minilm")
repo = folder / "repo"
if kind == "swappable":
    write_python_model(repo, folder / "m.swappable.onnx", base.signature, "m", "swappable",
                       packs={"a": load_pack(folder / "a.onnx_adapter")})
else:
    write_python_model(repo, folder / "m.routed.onnx", base.signature, "m", "routed", adapters=["a", "b"])
began = time.perf_counter()
server = start_server(repo)
ready = time.perf_counter() - began
import tritonclient.http as http
client = http.InferenceServerClient(server.http[len("http://"):])
ids = np.random.default_rng(0).integers(1000, 20000, (1, 64), dtype=np.int64)
inputs = [http.InferInput(n, [1, 64], "INT64") for n in ("input_ids", "attention_mask")]
inputs[0].set_data_from_numpy(ids); inputs[1].set_data_from_numpy(np.ones_like(ids))
client.infer("m-python", inputs, parameters={"adapter": "a"})
client.close()
stubs = []
for pid in Path("/proc").iterdir():
    try:
        if pid.name.isdigit() and (pid / "comm").read_text().startswith("triton_python_b"):
            status = (pid / "status").read_text()
            if f"PPid:\t{server.process.pid}" in status:
                hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM"))
                torch = "libtorch" in (pid / "maps").read_text()
                stubs.append((hwm, torch))
    except OSError:
        pass
server.stop()
assert stubs, "no stub process found"
print(json.dumps({"ready_s": ready, "stub_peak_rss_mib": max(h for h, _ in stubs) / 1024,
                  "stub_imports_torch": any(t for _, t in stubs)}))
"""


def build(folder: Path) -> None:
    """The swappable MiniLM export and its pack, and the routed export of two adapters, once, with this checkout."""
    from exporters.swappable import export_routed, export_swappable
    from surgery.adapters import AdapterSpec
    from surgery.packs import pack_from_model, save_pack
    from surgery.pipeline import open_model, stand_in_adapted

    if (folder / "m.routed.onnx").is_file():
        return
    base = open_model("minilm")
    a = stand_in_adapted(base, AdapterSpec("houlsby", r=8), folder / "a.adapted.pt2", 1, 101)
    b = stand_in_adapted(base, AdapterSpec("houlsby", r=8), folder / "b.adapted.pt2", 2, 102)
    export_swappable(a, folder / "m.swappable.onnx")
    save_pack(pack_from_model(a.gm.state_dict(), a.manifest), folder / "a.onnx_adapter")
    export_routed([a, b], folder / "m.routed.onnx")


def side(tree: Path, folder: Path, kind: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="side-", dir=folder))
    for name in ("m.swappable.onnx", "a.onnx_adapter", "m.routed.onnx"):
        os.link(folder / name, work / name)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", CHILD, str(work), kind]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    shutil.rmtree(work, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmarks.timing import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="a checkout of the tool from before the change")
    parser.add_argument("--before-label", help="what --before is (e.g. the commit it was archived from)")
    parser.add_argument("--kinds", default="swappable,routed", help="the exports to serve")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="keep the export here (reused when present)")
    add_output(parser, "benchmarks/results")
    args = parser.parse_args()
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="surgery-triton-runtime-"))
    folder.mkdir(parents=True, exist_ok=True)
    build(folder)
    kinds = args.kinds.split(",")
    sides = {"before": Path(args.before).resolve(), "after": ROOT}
    runs: dict[str, list[dict]] = {f"{kind} {label}": [] for kind in kinds for label in sides}
    for tree in sides.values():  # unrecorded: each side makes its cached environment here, if it has one
        side(tree, folder, kinds[0])
    for rep in range(args.repeats):
        for kind in kinds:
            for label in list(sides)[:: 1 if rep % 2 == 0 else -1]:
                r = side(sides[label], folder, kind)
                runs[f"{kind} {label}"].append(r)
                print(f"repeat {rep + 1} {kind:<9} {label:<6} ready {r['ready_s']:.2f} s  stub peak RSS "
                      f"{r['stub_peak_rss_mib']:.0f} MiB  torch {r['stub_imports_torch']}", flush=True)  # fmt: skip

    def stats(rs: list[dict], key: str) -> dict:
        values = [r[key] for r in rs]
        return {key: statistics.median(values), key + "_range": [min(values), max(values)]}

    summary = {
        name: stats(rs, "ready_s") | stats(rs, "stub_peak_rss_mib")
        | {"stub_imports_torch": any(r["stub_imports_torch"] for r in rs)}
        for name, rs in runs.items()
    }  # fmt: skip
    host = machine()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python -m benchmarks.triton_runtime " + " ".join(sys.argv[1:])
    report = {
        "machine": host, "date": date, "command": command, "before": args.before_label or args.before,
        "repeats": args.repeats, "summary": summary, "runs": runs,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_runtime.json").write_text(json.dumps(report, indent=1))
    lines = [
        "| export | model code | server ready (s) | range | stub peak RSS (MiB) | range | torch in the stub |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for kind in kinds:
        b, a = summary[f"{kind} before"], summary[f"{kind} after"]
        for label, s in (("before: imports the tool", b), ("after: numpy + onnxruntime", a)):
            lines.append(
                f"| {kind} | {label} | {s['ready_s']:.2f} | {s['ready_s_range'][0]:.2f}-{s['ready_s_range'][1]:.2f} | "
                f"{s['stub_peak_rss_mib']:.0f} | "
                f"{s['stub_peak_rss_mib_range'][0]:.0f}-{s['stub_peak_rss_mib_range'][1]:.0f} | "
                f"{'yes' if s['stub_imports_torch'] else 'no'} |"
            )
        ratios.append(
            f"{kind}: peak RSS after/before {a['stub_peak_rss_mib'] / b['stub_peak_rss_mib']:.2f}, "
            f"ready time after/before {a['ready_s'] / b['ready_s']:.2f}"
        )
    text = (
        f"# The Python-backend stub without torch\n\n{date}. Triton's Python-backend stub serving MiniLM exports "
        f"(Houlsby r=8), bundled tritonserver (nvidia-pytriton 0.7.0), one request each. {host.get('cpu', '')}, "
        f"{host.get('cores', '')} cores, Python {host.get('python', '')}, onnxruntime {host.get('onnxruntime', '')}; "
        f"{args.repeats} alternated runs per side, medians.\n\n`{command}`\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "; ".join(ratios)
        + ".\n\n"
        + f"Before: {args.before_label or args.before}; after: this checkout. The stub's peak RSS is VmHWM after the "
        "load and one request. After, a swappable model also holds a session of its base-only graph (1/base.onnx, "
        "the base weights a second time) for requests without an adapter; before, those ran the empty slots.\n"
    )
    (out / "triton_runtime.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
