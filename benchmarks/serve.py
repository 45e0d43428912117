"""Load on a real Triton server (bundled in nvidia-pytriton): MiniLM with adapters, requests from concurrent clients.

    python -m benchmarks.serve [--clients 1,8,32] [--seconds 8] [--repeats 3] [--seq 128] [-o benchmarks/results]

Four adapted MiniLM models (Houlsby r=8, distinct random weights) are exported once as one routed ONNX (`--route`)
and served as two Python-backend models of the same file, plus the base model:
- (a) `one adapter`: the routed model, every request for adapter a;
- (b) `mixed`: the routed model, requests spread over a, b, c, d; Triton's dynamic batcher merges them and the model
  runs each batch in one ONNX Runtime call (adapter_id per row);
- (c) `per adapter`: the same spread on the same ONNX, but the model runs each batch one adapter at a time
  (`group_by_adapter`), as a server that can only serve one adapter per call would;
- `base`: the base model (no adapters) in the same Python backend: what the backend costs without adapters.
Each client sends batch-1 requests of `--seq` tokens over gRPC, back to back, for `--seconds`. Runs are interleaved
(every repeat goes through every case and client count, in a shuffled order) and each figure is the median over
repeats: throughput in requests/s, p50 and p99 latency in ms, and the mean batch size Triton executed.
Writes serve.json and serve.md under --output.

Against a server it did not start (any Triton that serves a model `surgery export --triton-repo` wrote, started by
hand or in a container), give its gRPC address; the one case is `--model` with requests spread over `--adapters`
(an empty name is the base model):

    python -m benchmarks.serve --url 127.0.0.1:8001 --model routed-python --adapters a,b,c, --clients 1,8
    python -m benchmarks.serve --build-only --workdir bench   # the repository above, to serve yourself
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import machine
from exporters.onnx import export_onnx
from exporters.swappable import export_routed
from exporters.triton import write_python_model
from exporters.triton_server import start_server
from surgery.adapters import AdapterSpec
from surgery.pipeline import open_model, stand_in_adapted
from benchmarks.args import add_output

ADAPTERS = ["a", "b", "c", "d"]
CASES = {  # name: (model, adapters the requests are spread over)
    "one adapter (a)": ("routed-python", ["a"]),
    "mixed (b)": ("routed-python", ADAPTERS),
    "per adapter (c)": ("grouped-python", ADAPTERS),
    "base": ("base-python", [None]),
}


def build_repo(folder: Path) -> Path:
    repo = folder / "repo"
    if (repo / "base-python" / "config.pbtxt").is_file():
        return repo
    base = open_model("minilm")
    models = [
        stand_in_adapted(base, AdapterSpec("houlsby", r=8), folder / f"{n}.adapted.pt2", 30 + i, 130 + i)
        for i, n in enumerate(ADAPTERS)
    ]
    export_routed(models, folder / "routed.onnx")
    export_onnx(base.gm, base.signature, folder / "base.onnx")
    write_python_model(repo, folder / "routed.onnx", base.signature, "routed", "routed", adapters=ADAPTERS)
    write_python_model(
        repo, folder / "routed.onnx", base.signature, "grouped", "routed", adapters=ADAPTERS, group_by_adapter=True
    )
    write_python_model(repo, folder / "base.onnx", base.signature, "base", "plain")
    return repo


class Remote:
    """A server this benchmark did not start: its gRPC address."""

    def __init__(self, grpc: str):
        self.grpc = grpc


def load(server, model: str, adapters: list, clients: int, seconds: float, seq: int) -> dict:
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(1, seq), dtype=np.int64)
    mask = np.ones((1, seq), dtype=np.int64)
    stats_client = grpcclient.InferenceServerClient(url=server.grpc)

    def counts() -> tuple[int, int]:
        s = stats_client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        c = grpcclient.InferenceServerClient(url=server.grpc)
        inputs = [
            grpcclient.InferInput("input_ids", [1, seq], "INT64"),
            grpcclient.InferInput("attention_mask", [1, seq], "INT64"),
        ]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(mask)
        outputs = [grpcclient.InferRequestedOutput("pooler_output")]
        n = k
        c.infer(model, inputs, outputs=outputs)  # warm-up, untimed
        start_barrier.wait()
        while time.perf_counter() < stop_at[0]:
            adapter = adapters[n % len(adapters)]
            n += 1
            t = time.perf_counter()
            try:
                c.infer(model, inputs, outputs=outputs, parameters={"adapter": adapter} if adapter else None)
            except Exception as exc:  # noqa: BLE001  counted and reported
                errors.append(str(exc))
                continue
            latencies[k].append(time.perf_counter() - t)
        c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    before = counts()
    stop_at[0] = time.perf_counter() + seconds + 0.5  # the barrier releases right after
    start_barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    after = counts()
    stats_client.close()
    lat = np.array([x for per in latencies for x in per]) * 1000
    inferences, executions = after[0] - before[0], after[1] - before[1]
    return {
        "requests": int(lat.size),
        "errors": len(errors),
        "throughput": lat.size / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "mean_batch": inferences / executions if executions else float("nan"),
    }


def markdown(summary: dict, settings: dict, host: dict, runs: dict) -> str:
    """The table; `runs` ("CLIENTS CASE": one dict per repeat) gives each throughput's range over the repeats."""
    lines = [
        "| clients | case | requests/s | range over repeats | p50 ms | p99 ms | mean batch | vs (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients, cases in summary.items():
        ref = cases.get("one adapter (a)", next(iter(cases.values())))["throughput"]
        for case, s in cases.items():
            each = [r["throughput"] for r in runs[f"{clients} {case}"]]
            lines.append(
                f"| {clients} | {case} | {s['throughput']:.1f} | {min(each):.1f}-{max(each):.1f} | {s['p50_ms']:.1f} | "
                f"{s['p99_ms']:.1f} | {s['mean_batch']:.1f} | {100 * (s['throughput'] / ref - 1):+.1f}% |"
            )
    load = settings.get("load_before")
    what = settings.get("url") and f"{settings['url']} (a server this benchmark did not start)"
    head = (
        (f"{what}; " if what else "MiniLM, Houlsby r=8, 4 adapters; ")
        + f"batch-1 requests of {settings['seq']} tokens over gRPC; "
        f"{settings['seconds']} s per run, {settings['repeats']} interleaved repeats, medians. "
        f"{host.get('cpu', '')}, {host.get('cores', '')} cores, server and clients on the same machine"
        + (f"; load average {load:.2f} before the run." if load is not None else ".")
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--workdir", help="keep the models and repository here (reused when present)")
    add_output(parser, "benchmarks/results")
    parser.add_argument("--url", help="the gRPC address (host:port) of a server this benchmark does not start")
    parser.add_argument("--model", default="routed-python", help="with --url: the model to load")
    parser.add_argument("--adapters", default="a,b,c,d", help="with --url: adapters to spread requests over ('' base)")
    parser.add_argument("--build-only", action="store_true", help="write the repository to --workdir and stop")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()[0]  # the table says how quiet the machine was
    cases = CASES
    if args.url:
        adapters = [a or None for a in args.adapters.split(",")]
        cases = {f"{args.model} over {args.adapters}": (args.model, adapters)}
    runs: dict[tuple[int, str], list[dict]] = {}

    def measure(server) -> None:
        order = random.Random(0)
        for rep in range(args.repeats):
            plan = [(c, case) for c in clients for case in cases]
            order.shuffle(plan)
            for c, case in plan:
                model, adapters = cases[case]
                r = load(server, model, adapters, c, args.seconds, args.seq)
                runs.setdefault((c, case), []).append(r)
                print(
                    f"repeat {rep + 1} clients {c:>2} {case:<16} {r['throughput']:7.1f} req/s"
                    f"  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms"
                    f"  batch {r['mean_batch']:.1f}  errors {r['errors']}",
                    flush=True,
                )

    if args.url:
        measure(Remote(args.url))
    else:
        folder = Path(args.workdir or tempfile.mkdtemp(prefix="surgery-serve-bench-"))
        folder.mkdir(parents=True, exist_ok=True)
        print(f"building the repository in {folder} ...", flush=True)
        repo = build_repo(folder)
        if args.build_only:
            print(f"wrote {repo}; serve it (e.g. surgery serve {repo}) and run again with --url", flush=True)
            return
        with start_server(repo) as server:
            print(f"server {server.http}, log {server.log}", flush=True)
            measure(server)
    summary = {
        c: {case: {k: statistics.median(r[k] for r in runs[(c, case)]) for k in runs[(c, case)][0]} for case in cases}
        for c in clients
    }
    settings = {
        "seconds": args.seconds,
        "repeats": args.repeats,
        "seq": args.seq,
        "clients": clients,
        "load_before": load_before,
        "url": args.url,
    }
    host = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": host,
        "settings": settings,
        "summary": summary,
        "runs": {f"{c} {k}": v for (c, k), v in runs.items()},
    }
    (out / "serve.json").write_text(json.dumps(report, indent=1))
    text = markdown(summary, settings, host, report["runs"])
    (out / "serve.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
