"""What a plain `torch.onnx.export` of a Hugging Face folder costs, beside `surgery export --stream`.

    python -m benchmarks.plain_export FOLDER [--dtype bf16] [--limit-gb 20] [-o out/plain_export.json]

A child process does what a user without this tool would: `AutoModel.from_pretrained(FOLDER, dtype=...)` (the
weights in memory), then `torch.onnx.export(model, (input_ids, attention_mask), dynamo=True, external_data=True)`
with dynamic batch and sequence, into a temporary folder. The parent polls the child's resident memory every 0.2 s
and kills it past `--limit-gb`, so that a model that does not fit ends as a measured "killed at N GB after T s"
instead of taking the machine down. Reports the phase reached (loaded, exported), wall time, and peak RSS (the
kernel's own maximum for the child, `ru_maxrss`, which counts the last moments before a kill too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.args import add_output

CHILD = r"""
import sys, time, torch
from transformers import AutoModel
folder, dtype, out = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
start = time.perf_counter()
model = AutoModel.from_pretrained(folder, dtype=dtype).eval()
model.config.use_cache = False  # the last hidden state only, as `export --stream --task feature-extraction`
print(f"PHASE loaded {time.perf_counter() - start:.1f}", flush=True)
ids = torch.ones(2, 16, dtype=torch.int64)
batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
with torch.no_grad():
    torch.onnx.export(model, (), out, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      dynamic_shapes=shapes, dynamo=True, external_data=True)
print(f"PHASE exported {time.perf_counter() - start:.1f}", flush=True)
"""
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def plain_export(folder: Path, dtype: str, limit_gb: float, tmp: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="plain-export-", dir=tmp) as work:
        out = Path(work) / "model.onnx"
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(folder), DTYPES[dtype], str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        polled, killed = 0, False
        while child.poll() is None:
            polled = max(polled, rss_kb(child.pid))
            if polled > limit_gb * 1e6:
                child.kill()
                killed = True
                break
            time.sleep(0.2)
        stdout, stderr = child.communicate()
        wall = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        phases = {p.split()[1]: float(p.split()[2]) for p in stdout.splitlines() if p.startswith("PHASE ")}
        data = [p for p in Path(work).iterdir() if p.name != "model.onnx"]
        result = {
            "folder": str(folder),
            "dtype": dtype,
            "outcome": f"killed at the {limit_gb:g} GB limit"
            if killed
            else "exported"
            if child.returncode == 0
            else f"failed (exit {child.returncode})",
            "phases_s": phases,
            "seconds": round(wall, 1),
            "peak_rss_gb": round(max(peak_kb, polled) / 1e6, 2),
            "output_gb": round(sum(p.stat().st_size for p in Path(work).iterdir()) / 1e9, 2) if not killed else None,
            "data_files": len(data),
        }
        if child.returncode not in (0, None) and not killed:
            result["last_stderr"] = (stderr.strip().splitlines() or [""])[-1][:300]
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--limit-gb", type=float, default=20.0, help="kill the export past this resident memory")
    p.add_argument("--tmp", help="where the export is written (and deleted)")
    add_output(p, Path("out/plain_export.json"), type=Path)
    a = p.parse_args()
    load = os.getloadavg()[0]
    result = plain_export(a.folder, a.dtype, a.limit_gb, a.tmp)
    result["machine"] = {"cpus": os.cpu_count(), "load_before": load}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
