"""Large models on a small machine: wall time and peak RSS of `surgery insert` and `surgery export` (which verifies)
per step, as subprocesses under `/usr/bin/time -f %M`, against the model's weight bytes.

    python -m benchmarks.large --model qwen2.5-0.5b --dtype fp32 bf16 --out benchmarks/results/large.json

The model is a config alone (random weights, no download): its shape is what costs memory. `qwen2.5-0.5b` is
Qwen2.5-0.5B's config (494M parameters, 1.98 GB in fp32), `llama-559m` a Llama-shaped model past 2 GB in fp32
(559M parameters).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "llama-559m": dict(
        model_type="llama",
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=18,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=512,
    ),
}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


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
    }


def run(model: str, dtype: str, folder: Path) -> dict:
    from transformers import AutoConfig

    spec = dict(CONFIGS[model])
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
        step["rss_over_weights"] = round(step["peak_rss_gb"] * 1e9 / weight_bytes, 2)
        print(model, dtype, json.dumps(step), flush=True)
    return {"params": params, "weight_gb": round(weight_bytes / 1e9, 2), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="qwen2.5-0.5b")
    parser.add_argument("--dtype", nargs="+", choices=sorted(BYTES), default=["fp32"])
    parser.add_argument("--out", default="benchmarks/results/large.json")
    args = parser.parse_args()
    results = {}
    for dtype in args.dtype:
        with tempfile.TemporaryDirectory(prefix="surgery-large-") as folder:
            results[dtype] = run(args.model, dtype, Path(folder))
    report = {"machine": platform.machine(), "model": args.model, "results": results}
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    old[args.model] = report
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
