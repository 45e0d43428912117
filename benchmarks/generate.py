"""Generation speed of an exported causal LM with its KV cache, on ONNX Runtime CPU, base and adapted.

    python -m benchmarks.generate [--model smollm2-135m] [--variants base,houlsby,...] [--runs 5] [--out out/generate]

The model is the real SmolLM2-135M (surgery/zoo.py, dequantized fp32), captured with `--task causal-lm`. Variants:
`base`; `houlsby` (r=8, random weights, baked); `lora` (q,v r=8, unmerged, baked) and `lora-merged` (folded into the
weights); `swappable` (the Houlsby export with its own pack active); `routed` (4 Houlsby models stacked, rows of the
batch on adapters 0..3). Each is measured through `exporters.runtime.Generator` (greedy, fp32, `--threads`):
- prefill: the first step of a 128-token prompt (the graph's run at past length 0, and the argmax);
- ttft: time to the first token of a short prompt (the issue's peers' measure);
- decode tok/s at batch 1 and 8: 32 new tokens from that prompt, per stream.
Median of `--runs`, variants in turn within each run; ONNX Runtime's spinning is off (DESIGN.md: sessions timed in
turn in one process fight over spinning thread pools). Writes JSON and Markdown beside the printed table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.timing import machine
from exporters.onnx import export_onnx
from exporters.runtime import Generator, TextTokenizer
from exporters.swappable import export_routed, export_swappable
from surgery.adapters import AdapterSpec, LoraSpec, stand_in_weights
from surgery.merge import merge_adapters
from surgery.packs import pack_from_model, save_pack
from surgery.pipeline import adapt, open_model, stand_in_adapted
from surgery.zoo import fetch

VARIANTS = ("base", "houlsby", "lora", "lora-merged", "swappable", "routed")
PROMPT = "The three primary colours are"


def build(variant: str, base, work: Path) -> tuple[Generator, dict]:
    """The variant's export, as a Generator, and the generate() arguments that select its adapter."""
    import copy
    import dataclasses

    path = work / f"{variant}.onnx"
    if variant == "base":
        export_onnx(base.gm, base.signature, path)
        return Generator(path, spinning=False), {}
    if variant in ("houlsby", "lora", "lora-merged"):
        m = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
        spec = AdapterSpec("houlsby", r=8) if variant == "houlsby" else LoraSpec({"q": 8, "v": 8})
        adapt(m, spec)
        stand_in_weights(m.gm, seed=1)
        if variant == "lora-merged":
            merge_adapters(m.gm)
        export_onnx(m.gm, m.signature, path)
        return Generator(path, spinning=False), {}
    models = [
        stand_in_adapted(base, AdapterSpec("houlsby", r=8), work / f"m{k}.adapted.pt2", seed=k, weights_seed=10 + k)
        for k in range(4 if variant == "routed" else 1)
    ]
    if variant == "swappable":
        export_swappable(models[0], path)
        gen = Generator(path, spinning=False)
        gen.load("own", save_pack(pack_from_model(models[0].gm.state_dict(), models[0].manifest), work / "own.pack"))
        return gen, {"adapter": "own"}
    export_routed(models, path)
    return Generator(path, spinning=False), {"adapter_ids": [0]}


def measure(gen: Generator, kwargs: dict, prompt: list[int], long_prompt: list[int]) -> dict[str, float]:
    def ids(batch: int) -> dict:
        if "adapter_ids" in kwargs:
            return {"adapter_ids": [k % 4 for k in range(batch)]}
        return kwargs

    t0 = time.perf_counter()
    gen.generate(long_prompt, 1, **ids(1))
    prefill = time.perf_counter() - t0
    one = gen.generate(prompt, 32, **ids(1))
    eight = gen.generate([prompt] * 8, 32, **ids(8))
    return {
        "prefill_128_ms": prefill * 1e3,
        "ttft_ms": one.ttft_s * 1e3,
        "decode_b1_tok_s": one.tokens_per_s,
        "decode_b8_tok_s_per_stream": eight.tokens_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/generate"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="generate-bench-"))
    gguf = fetch(args.model)  # a .gguf file (the GGUF checkpoints of surgery/zoo.py)
    tok = TextTokenizer.from_folder(gguf.parent)
    prompt = tok.encode(PROMPT)
    long_prompt = (prompt * 64)[:128]
    base = open_model(str(gguf), task="causal-lm")
    gens = {}
    for v in variants:
        t0 = time.perf_counter()
        gens[v] = build(v, base, work)
        print(f"{v}: exported and checked in {time.perf_counter() - t0:.0f} s", flush=True)
    for gen, kwargs in gens.values():  # warm-up
        gen.generate(prompt, 4, **kwargs)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.runs):
        for v in variants:
            runs[v].append(measure(*gens[v], prompt, long_prompt))
    rows = {v: {k: statistics.median(r[k] for r in runs[v]) for k in runs[v][0]} for v in variants}
    result = {"machine": machine(), "model": args.model, "prompt_tokens": len(prompt), "runs": args.runs, "rows": rows}
    lines = [
        f"ONNX Runtime CPU, {args.threads} threads, fp32, greedy; {args.model}; prompt {len(prompt)} tokens; "
        f"median of {args.runs}",
        "",
        "| variant | prefill 128 (ms) | time to first token (ms) | decode b1 (tok/s) | decode b8 (tok/s per stream) |",
        "|---|---|---|---|---|",
    ]
    for v, r in rows.items():
        lines.append(
            f"| {v} | {r['prefill_128_ms']:.1f} | {r['ttft_ms']:.1f} | {r['decode_b1_tok_s']:.1f} | "
            f"{r['decode_b8_tok_s_per_stream']:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    (args.out / "generate.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "generate.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
