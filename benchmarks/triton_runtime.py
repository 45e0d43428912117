"""The Python-backend model's serving process (Triton's stub) before and after the torch-free model code: its peak
RSS and the time the server takes to be ready with it.

    python -m benchmarks.triton_runtime --before /tmp/before-tree [--repeats 3] [--out benchmarks/results]

`--before` is a checkout of the tool from before the change (e.g. `git archive REV | tar -x -C DIR`); the after is
this checkout. Each side, in a subprocess with PYTHONPATH set to its tree, writes the same swappable MiniLM export
(Houlsby r=8, one pack) as a Python-backend model with its own `write_python_model` and serves it with its own
`start_server` (the bundled tritonserver), then reads:
- `ready_s`: from the start of `start_server` until the server reports the model ready;
- `stub_peak_rss_mib`: the stub process's peak resident set (VmHWM) after the load and one request;
- `stub_modules`: whether torch was imported in the stub (its /proc maps hold libtorch).
After one unrecorded run per side (which makes any environment a side caches), the sides alternate,
`--repeats` times each; the report gives medians and ranges. Writes triton_runtime.json and
triton_runtime.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1])
from exporters.triton import write_python_model
from exporters.triton_server import start_server
from surgery.packs import load_pack
from surgery.pipeline import open_model
base = open_model("minilm")
repo = folder / "repo"
write_python_model(repo, folder / "m.swappable.onnx", base.signature, "m", "swappable",
                   packs={"a": load_pack(folder / "a.onnx_adapter")})
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
    """The swappable MiniLM export and its pack, once, with this checkout."""
    from exporters.swappable import export_swappable
    from surgery.adapters import AdapterSpec
    from surgery.packs import pack_from_model, save_pack
    from surgery.pipeline import open_model, stand_in_adapted

    if (folder / "a.onnx_adapter").is_file():
        return
    base = open_model("minilm")
    a = stand_in_adapted(base, AdapterSpec("houlsby", r=8), folder / "a.adapted.pt2", 1, 101)
    export_swappable(a, folder / "m.swappable.onnx")
    save_pack(pack_from_model(a.gm.state_dict(), a.manifest), folder / "a.onnx_adapter")


def side(tree: Path, folder: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="side-", dir=folder))
    for name in ("m.swappable.onnx", "a.onnx_adapter"):
        os.link(folder / name, work / name)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(work)], capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmarks.timing import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="a checkout of the tool from before the change")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="keep the export here (reused when present)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="surgery-triton-runtime-"))
    folder.mkdir(parents=True, exist_ok=True)
    build(folder)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for tree in (Path(args.before), ROOT):  # unrecorded: each side makes its cached environment here, if it has one
        side(tree.resolve(), folder)
    for rep in range(args.repeats):
        for label, tree in (("before", Path(args.before)), ("after", ROOT))[:: 1 if rep % 2 == 0 else -1]:
            r = side(tree.resolve(), folder)
            runs[label].append(r)
            print(f"repeat {rep + 1} {label:<6} ready {r['ready_s']:.2f} s  stub peak RSS "
                  f"{r['stub_peak_rss_mib']:.0f} MiB  torch {r['stub_imports_torch']}", flush=True)  # fmt: skip

    def stats(rs: list[dict], key: str) -> dict:
        values = [r[key] for r in rs]
        return {key: statistics.median(values), key + "_range": [min(values), max(values)]}

    summary = {
        label: stats(rs, "ready_s") | stats(rs, "stub_peak_rss_mib")
        | {"stub_imports_torch": any(r["stub_imports_torch"] for r in rs)}
        for label, rs in runs.items()
    }  # fmt: skip
    host = machine()
    command = "python -m benchmarks.triton_runtime " + " ".join(sys.argv[1:])
    report = {"machine": host, "command": command, "repeats": args.repeats, "summary": summary, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_runtime.json").write_text(json.dumps(report, indent=1))
    b, a = summary["before"], summary["after"]
    lines = [
        "| model code | server ready (s) | range | stub peak RSS (MiB) | range | torch in the stub |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in (("before: imports the tool (torch)", b), ("after: numpy + onnxruntime", a)):
        lines.append(
            f"| {label} | {s['ready_s']:.2f} | {s['ready_s_range'][0]:.2f}-{s['ready_s_range'][1]:.2f} | "
            f"{s['stub_peak_rss_mib']:.0f} | "
            f"{s['stub_peak_rss_mib_range'][0]:.0f}-{s['stub_peak_rss_mib_range'][1]:.0f} | "
            f"{'yes' if s['stub_imports_torch'] else 'no'} |"
        )
    text = (
        f"Triton's Python-backend stub serving a swappable MiniLM export (Houlsby r=8, one pack), bundled "
        f"tritonserver (nvidia-pytriton 0.7.0), one request. {host.get('cpu', '')}, {host.get('cores', '')} cores; "
        f"{args.repeats} alternated runs per side, medians.\n\n`{command}`\n\n" + "\n".join(lines) + "\n\n"
        f"Peak RSS after/before: {a['stub_peak_rss_mib'] / b['stub_peak_rss_mib']:.2f}; "
        f"ready time after/before: {a['ready_s'] / b['ready_s']:.2f}.\n"
    )
    (out / "triton_runtime.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
