"""Generation speed of an exported causal LM with its KV cache, on ONNX Runtime CPU or CUDA, base and adapted; and
the same loop over the captured torch graph on the CPU or a CUDA GPU.

    python -m benchmarks.generate [--model smollm2-135m,gpt2-medium] [--variants base,houlsby,...] [--runs 5]
                                  [--backend ort|ort-cuda|torch|torch-cuda] [--out out/generate]

Models (one after the other, each with all its variants): the real SmolLM2-135M (surgery/zoo.py, dequantized fp32)
and a GPT-2-medium shape with random weights (surgery/architectures.py BUILTIN: 24 layers, d 1024, vocab 50257; a fixed
5-token prompt, no tokenizer), both captured with `--task causal-lm`. Variants:
`base`; `houlsby` (r=8, random weights, baked); `lora` (q,v r=8, unmerged, baked) and `lora-merged` (folded into the
weights); `swappable` (the Houlsby export with its own pack active); `routed` (4 Houlsby models stacked, rows of the
batch on adapters 0..3). Each is measured through `exporters.runtime.Generator` (greedy, fp32, `--threads`):
- prefill: the first step of a 128-token prompt (the graph's run at past length 0, and the argmax);
- ttft: time to the first token of a short prompt (the issue's peers' measure);
- decode tok/s at batch 1 and 8: 32 new tokens from that prompt, per stream.
Median of `--runs`, variants in turn within each run, the order rotated from run to run (on 2026-11-28 lora-merged,
the base graph with other weights, came out 13% slower than base, third in a fixed order: an error of the method,
larger than the 3% target, which rotation spreads over the variants); ONNX Runtime's spinning is off (DESIGN.md:
sessions timed in turn in one process fight over spinning thread pools). Each adapted variant's overhead is against
`base` (the issue's target: decode at batch 1 <= 3% slower per token); `lora-merged`, the base graph with other
weights, is the control: where it is more than the target from base, the table gives no verdict. Every variant is
exported first, one at a time (its torch copies freed), then all sessions are opened: GPT-2 medium holds six
sessions of 1.4 GB of weights each.
Writes generate_MODEL.{json,md} per model beside the printed tables.

`--backend torch` / `torch-cuda` (issue 12's GPU rows): base, houlsby, lora and lora-merged run as the captured
graph itself (re-exported, moved to the device with torch.export's move_to_device_pass), eager, through
`TorchGenerator`: the same inputs, cache and greedy steps as the ONNX loop, each step's tokens brought to the host.
`--backend ort-cuda` (the ORT CUDA rows): the six ONNX variants through `Generator` on ONNX Runtime's CUDA provider
with IO binding, the KV cache kept on the GPU from step to step (only the logits come to the host); it needs
onnxruntime-gpu (`pip install -e '.[gpu]'`) and stops at once, before any export, where onnxruntime has no
CUDAExecutionProvider. Files: generate_MODEL_BACKEND.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.timing import machine
from exporters.onnx import export_onnx
from exporters.runtime import Generation, Generator, TextTokenizer
from exporters.verify import CPU, CUDA
from exporters.swappable import export_routed, export_swappable
from surgery.adapters import AdapterSpec, LoraSpec, stand_in_weights
from surgery.architectures import BUILTIN
from surgery.merge import merge_adapters
from surgery.packs import pack_from_model, save_pack
from surgery.pipeline import adapt, open_model, stand_in_adapted
from surgery.zoo import CHECKPOINTS, fetch

VARIANTS = ("base", "houlsby", "lora", "lora-merged", "swappable", "routed")
TORCH_VARIANTS = ("base", "houlsby", "lora", "lora-merged")  # swappable and routed are ONNX Runtime forms
ONNX_BACKENDS = ("ort", "ort-cuda")
LABELS = {
    "ort": "ONNX Runtime CPU",
    "ort-cuda": "ONNX Runtime CUDA, IO binding (the KV cache stays on the GPU)",
    "torch": "torch CPU, eager",
    "torch-cuda": "torch CUDA, eager (threads: the host's)",
}
BACKENDS = tuple(LABELS)
MODELS = ("smollm2-135m", "gpt2-medium")
PROMPT = "The three primary colours are"
PROMPT_IDS = [464, 1115, 4165, 7577, 389]  # a random-weight model's prompt: 5 tokens, as the text's in SmolLM2
TARGET = 0.03  # decode overhead at batch 1 over the base
# Each export's own check against torch (atol + rtol x max|torch|): rtol 5e-4, not the default 1e-4. The default refused
# SmolLM2's swappable export with its own pack once (logits 1.09e-4 of max|torch| ~34: fp32 rounding over 30 layers
# with random-weight adapters), which stopped the benchmark, whose subject is time.
CHECK = dict(tolerance=1e-4, rtol=5e-4)


def open_lm(model: str, work: Path):
    """(captured causal LM, prompt token ids): a real checkpoint of surgery/zoo.py with its tokenizer, or a
    built-in shape (surgery/architectures.py BUILTIN) with random weights and `PROMPT_IDS`."""
    if model in BUILTIN:
        from transformers import AutoConfig

        kwargs = dict(BUILTIN[model])
        folder = work / model
        AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).save_pretrained(folder)
        return open_model(str(folder / "config.json"), task="causal-lm"), PROMPT_IDS
    if model not in CHECKPOINTS:
        raise SystemExit(
            f"--model {model}: a real checkpoint ({', '.join(CHECKPOINTS)}) or a shape ({', '.join(BUILTIN)})"
        )
    gguf = fetch(model)  # a .gguf file (the GGUF checkpoints of surgery/zoo.py)
    return open_model(str(gguf), task="causal-lm"), TextTokenizer.from_folder(gguf.parent).encode(PROMPT)


def adapted_variant(variant: str, base):
    """A baked variant as a captured model (its own copy of the weights): houlsby, lora or lora-merged."""
    import copy
    import dataclasses

    m = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    spec = AdapterSpec("houlsby", r=8) if variant == "houlsby" else LoraSpec({"q": 8, "v": 8})
    adapt(m, spec)
    stand_in_weights(m.gm, seed=1)
    if variant == "lora-merged":
        merge_adapters(m.gm)
    return m


def export(variant: str, base, work: Path) -> tuple[Path, dict]:
    """The variant's ONNX (its torch copies are freed on return), and how to open it: the pack it takes, if any,
    and the generate() arguments that select its adapter."""
    path = work / f"{variant}.onnx"
    if variant in TORCH_VARIANTS:
        m = base if variant == "base" else adapted_variant(variant, base)
        export_onnx(m.gm, m.signature, path, **CHECK)
        return path, {}
    models = [
        stand_in_adapted(base, AdapterSpec("houlsby", r=8), work / f"m{k}.adapted.pt2", seed=k, weights_seed=10 + k)
        for k in range(4 if variant == "routed" else 1)
    ]
    if variant == "swappable":
        export_swappable(models[0], path, **CHECK)
        pack = save_pack(pack_from_model(models[0].gm.state_dict(), models[0].manifest), work / "own.onnx_adapter")
        return path, {"pack": pack, "adapter": "own"}
    export_routed(models, path, **CHECK)
    return path, {"adapter_ids": [0]}


class TorchGenerator:
    """Greedy decoding over the captured graph itself in torch, eager, on `device` (cpu or cuda): the torch rows of
    the benchmark. Step for step what `exporters.runtime.Generator` does on ONNX Runtime (the same inputs and cache
    layout, one graph for prefill and decode), with each step's tokens brought to the host as a generation loop
    must (to stream them, to check stop tokens). Prompts of one length (the benchmark's rows are one prompt)."""

    def __init__(self, captured, device: str):
        import torch

        from benchmarks.worker import on_device
        from surgery.capture import export_program

        self.torch = torch
        self.signature = captured.signature
        self.names = captured.signature.names
        program = export_program(captured.gm, captured.signature, "the benchmark's torch model")
        self.module = on_device(program, device)
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device)
        first = next(s for s in captured.signature.inputs if s.name == "past_key_values.0.key")
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.past = [n for n in self.names if n.startswith("past_key_values.")]

    def generate(self, prompts, max_new_tokens: int = 32) -> Generation:
        torch = self.torch
        rows = [list(prompts)] if isinstance(prompts[0], int) else [list(p) for p in prompts]
        if len({len(r) for r in rows}) != 1:
            raise SystemExit("TorchGenerator: prompts of one length only")
        B = len(rows)
        ids = torch.tensor(rows, dtype=torch.int64, device=self.device)
        mask = torch.ones_like(ids)
        empty = torch.zeros(B, self.kv_heads, 0, self.head_dim, device=self.device)
        feeds = {n: empty for n in self.past}
        out = Generation(tokens=[[] for _ in range(B)])
        with torch.inference_mode():
            start = time.perf_counter()
            for step in range(max_new_tokens):
                total = mask.shape[1]
                positions = torch.arange(total - ids.shape[1], total, device=self.device).expand(B, -1)
                feeds.update(input_ids=ids, attention_mask=mask, position_ids=positions)
                logits, *present = self.signature.call(self.module, [feeds[n] for n in self.names])
                token = logits[:, -1, :].argmax(-1)
                for b, t in enumerate(token.tolist()):  # to the host: a synchronize on CUDA
                    out.tokens[b].append(t)
                out.steps = step + 1
                if step == 0:
                    out.ttft_s = time.perf_counter() - start
                feeds.update(zip(self.past, present))
                ids = token[:, None]
                mask = torch.cat([mask, torch.ones_like(ids)], 1)
            out.decode_s = time.perf_counter() - start - out.ttft_s
        return out


def open_generator(path: Path, how: dict, threads: int, backend: str = "ort") -> tuple[Generator, dict]:
    """A variant's Generator (on CUDA: IO binding, its default there) and the generate() arguments it takes."""
    gen = Generator(path, threads=threads, spinning=False, providers=CUDA if backend == "ort-cuda" else CPU)
    if backend == "ort-cuda" and gen.device[0] != "cuda":  # ORT falls back to the CPU where CUDA fails to load
        raise SystemExit(
            f"--backend ort-cuda: ONNX Runtime opened {path.name} on {gen.session.get_providers()[0]}, not CUDA "
            "(the CUDA provider is missing or failed to load: see ONNX Runtime's warnings); "
            "no CPU figures under a CUDA label"
        )
    kwargs = dict(how)
    if "pack" in kwargs:
        gen.load(kwargs["adapter"], kwargs.pop("pack"))
    return gen, kwargs


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


def overheads(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each variant's cost over `base`, as a fraction: more time per prefill, per first token, per decoded token."""
    base = rows.get("base")
    if base is None:
        return {}
    out = {}
    for v, r in rows.items():
        out[v] = {
            "prefill": r["prefill_128_ms"] / base["prefill_128_ms"] - 1,
            "ttft": r["ttft_ms"] / base["ttft_ms"] - 1,
            "decode_b1": base["decode_b1_tok_s"] / r["decode_b1_tok_s"] - 1 if r["decode_b1_tok_s"] else float("nan"),
            "decode_b8": base["decode_b8_tok_s_per_stream"] / r["decode_b8_tok_s_per_stream"] - 1
            if r["decode_b8_tok_s_per_stream"]
            else float("nan"),
        }
    return out


def table(model: str, rows: dict, over: dict, args, prompt_tokens: int) -> str:
    def pct(v: str, key: str) -> str:
        return f" ({over[v][key]:+.1%})" if v in over and v != "base" else ""

    lines = [
        f"{LABELS[args.backend]}, {args.threads} threads, fp32, greedy; {model}; prompt {prompt_tokens} tokens; "
        f"median of {args.runs}; (+x%): more time than base",
        "",
        "| variant | prefill 128 (ms) | time to first token (ms) | decode b1 (tok/s) | b1 decode overhead "
        f"(target <= {TARGET:.0%}) | decode b8 (tok/s per stream) |",
        "|---|---|---|---|---|---|",
    ]
    control = over.get("lora-merged", {}).get("decode_b1")  # the base graph with other weights: 0 but for noise
    trusted = control is None or abs(control) <= TARGET
    for v, r in rows.items():
        verdict = ""
        if v in over and v != "base":
            verdict = f"{over[v]['decode_b1']:+.1%} " + ("met" if over[v]["decode_b1"] <= TARGET else "missed")
            verdict = verdict if trusted else f"{over[v]['decode_b1']:+.1%}, no verdict"
        lines.append(
            f"| {v} | {r['prefill_128_ms']:.1f}{pct(v, 'prefill')} | {r['ttft_ms']:.1f}{pct(v, 'ttft')} | "
            f"{r['decode_b1_tok_s']:.1f} | {verdict} | {r['decode_b8_tok_s_per_stream']:.1f}{pct(v, 'decode_b8')} |"
        )
    if not trusted:
        lines += [
            "",
            f"No verdict: lora-merged, the base graph with other weights, decodes {control:+.1%} from base, more than "
            f"the {TARGET:.0%} target; this run's error is larger than the effect it would measure.",
        ]
    return "\n".join(lines)


def bench_model(model: str, variants: list[str], args) -> None:
    with tempfile.TemporaryDirectory(prefix="generate-bench-") as tmp:
        work = Path(tmp)
        base, prompt = open_lm(model, work)
        long_prompt = (prompt * 128)[:128]
        if args.backend in ONNX_BACKENDS:
            exports = {}
            for v in variants:
                t0 = time.perf_counter()
                exports[v] = export(v, base, work)
                gc.collect()
                print(f"{model} {v}: exported and checked in {time.perf_counter() - t0:.0f} s", flush=True)
            del base
            gc.collect()
            gens = {v: open_generator(path, how, args.threads, args.backend) for v, (path, how) in exports.items()}
        else:
            import torch

            torch.set_num_threads(args.threads)
            device = "cuda" if args.backend == "torch-cuda" else "cpu"
            gens = {}
            for v in variants:
                gens[v] = (TorchGenerator(base if v == "base" else adapted_variant(v, base), device), {})
            del base
            gc.collect()
        for gen, kwargs in gens.values():  # warm-up
            gen.generate(prompt, 4, **kwargs)
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for k in range(args.runs):  # the order rotates run to run: a variant's place in the turn costs time too
            for v in variants[k % len(variants) :] + variants[: k % len(variants)]:
                runs[v].append(measure(*gens[v], prompt, long_prompt))
        del gens
    rows = {v: {k: statistics.median(r[k] for r in runs[v]) for k in runs[v][0]} for v in variants}
    over = overheads(rows)
    result = {
        "machine": machine(),
        "model": model,
        "prompt_tokens": len(prompt),
        "runs": args.runs,
        "threads": args.threads,
        "rows": rows,
        "overhead_vs_base": over,
        "target_decode_b1": TARGET,
        "per_run": runs,
    }
    result["backend"] = args.backend
    text = table(model, rows, over, args, len(prompt))
    print(text, flush=True)
    name = f"generate_{model}" + ("" if args.backend == "ort" else f"_{args.backend}")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="ort", choices=BACKENDS)
    parser.add_argument("--out", type=Path, default=Path("out/generate"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    allowed = VARIANTS if args.backend in ONNX_BACKENDS else TORCH_VARIANTS
    unknown = set(variants) - set(allowed)
    if unknown:
        raise SystemExit(f"variants {sorted(unknown)} not on --backend {args.backend}; from: {', '.join(allowed)}")
    from benchmarks.harness import missing_backend

    missing = missing_backend(args.backend)  # before any export: a GPU row that cannot run stops here
    if missing:
        raise SystemExit(f"--backend {args.backend}: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)
    for model in filter(None, args.model.split(",")):
        bench_model(model, variants, args)


if __name__ == "__main__":
    main()
