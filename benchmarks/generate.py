"""Generation speed of an exported causal LM with its KV cache, on ONNX Runtime CPU or CUDA, base and adapted; and
the same loop over the captured torch graph on the CPU or a CUDA GPU.

    python -m benchmarks.generate [--model smollm2-135m,gpt2-medium] [--variants base,houlsby,...] [--rounds 3]
                                  [--alternations 5] [--backend ort|ort-cuda|torch|torch-cuda] [--work DIR]
                                  [-o out/generate]

Models (one after the other, each with all its variants): the real SmolLM2-135M (surgery/zoo.py, dequantized fp32)
and a GPT-2-medium shape with random weights (surgery/architectures.py BUILTIN: 24 layers, d 1024, vocab 50257; a fixed
5-token prompt, no tokenizer), both captured with `--task causal-lm`. Variants:
`base`; `houlsby` (r=8, random weights, baked); `lora` (q,v r=8, unmerged, baked) and `lora-merged` (folded into the
weights); `swappable` (the Houlsby export with its own pack active); `routed` (4 Houlsby models stacked, rows of the
batch on adapters 0..3). Each is measured through `exporters.runtime.Generator` (greedy, fp32, `--threads`):
- prefill: the first step of a 128-token prompt (the graph's run at past length 0, and the argmax);
- ttft: time to the first token of a short prompt (the measure onnxruntime-genai and optimum report);
- decode tok/s at batch 1 and 8: 32 new tokens from that prompt, per stream.
Every adapted variant is timed in a pair with `base`, never beside the other variants: sessions of one process can
differ from each other by more than any adapter costs, and the difference follows the session, not its place in the turn
(figures: benchmarks/README.md, "Generation with the KV cache"). So each exported variant is written to `--work` once;
then for each variant, in each of `--rounds` rounds (the variants' order rotated from round to round), a fresh process
opens base and that variant only and measures both `--alternations` times: the two prefills called in turn, and each
generation stepped in lockstep with the other's (one decode step of base, one of the variant, and so on:
`Generator.steps`), so that every step is timed beside a step of the other and a slow spell of a noisy machine falls on
both (whole generations in turn, seconds apart, scatter far more). Which side goes first alternates; ONNX Runtime's
spinning is off (sessions timed in turn fight over spinning thread pools). A variant's overhead on each measure is the
median of its paired ratios to base over every alternation of every round, with a 95% interval (benchmarks/timing.py).
The target: decode at batch 1 <= 3% slower per token. `lora-merged`, the base graph with other weights, is the control:
where its decode is more than the target from base, the table gives no verdict. The torch backends build their pairs in
one process, one pair at a time.
Writes generate_MODEL.{json,md} per model beside the printed tables.

`--backend torch` / `torch-cuda` (the GPU rows): base, houlsby, lora and lora-merged run as the captured
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.timing import lockstep as in_lockstep
from benchmarks.timing import machine, paired_overhead
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
from benchmarks.args import add_output

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
    built-in shape (surgery/architectures.py BUILTIN) or a config.json with random weights and `PROMPT_IDS`."""
    if model.endswith(".json"):  # a config of one's own (random weights): the tests' tiny shapes
        vocab = json.loads(Path(model).read_text())["vocab_size"]
        return open_model(model, task="causal-lm"), [t % vocab for t in PROMPT_IDS]
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


def export(variant: str, base, work: Path) -> Path:
    """The variant's ONNX in `work` (its torch copies are freed on return), with what it needs to open (a pack).
    A variant whose export finished before (`VARIANT.done` beside it) is not exported again."""
    path, done = work / f"{variant}.onnx", work / f"{variant}.done"
    if done.is_file():
        return path
    if variant in TORCH_VARIANTS:
        m = base if variant == "base" else adapted_variant(variant, base)
        export_onnx(m.gm, m.signature, path, **CHECK)
    else:
        models = [
            stand_in_adapted(base, AdapterSpec("houlsby", r=8), work / f"m{k}.adapted.pt2", seed=k, weights_seed=10 + k)
            for k in range(4 if variant == "routed" else 1)
        ]
        if variant == "swappable":
            export_swappable(models[0], path, **CHECK)
            save_pack(pack_from_model(models[0].gm.state_dict(), models[0].manifest), work / "own.onnx_adapter")
        else:
            export_routed(models, path, **CHECK)
    done.write_text("")
    return path


def how_to_open(variant: str, work: Path) -> dict:
    """The generate() arguments that select a variant's adapter, and its pack (`pack`: loaded before timing)."""
    if variant == "swappable":
        return {"pack": work / "own.onnx_adapter", "adapter": "own"}
    return {"adapter_ids": [0]} if variant == "routed" else {}


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
        return Generation.last_of(self.steps(prompts, max_new_tokens))

    def steps(self, prompts, max_new_tokens: int = 32):
        """As `Generator.steps`: the Generation after each step, its times those of the steps alone."""
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
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            with torch.inference_mode():
                total = mask.shape[1]
                positions = torch.arange(total - ids.shape[1], total, device=self.device).expand(B, -1)
                feeds.update(input_ids=ids, attention_mask=mask, position_ids=positions)
                logits, *present = self.signature.call(self.module, [feeds[n] for n in self.names])
                token = logits[:, -1, :].argmax(-1)
                for b, t in enumerate(token.tolist()):  # to the host: a synchronize on CUDA
                    out.tokens[b].append(t)
                feeds.update(zip(self.past, present))
                ids = token[:, None]
                mask = torch.cat([mask, torch.ones_like(ids)], 1)
            out.count_step(time.perf_counter() - start)
            yield out


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


METRICS = ("prefill_128_ms", "ttft_ms", "decode_b1_tok_s", "decode_b8_tok_s_per_stream")
SHORT = dict(zip(METRICS, ("prefill", "ttft", "decode_b1", "decode_b8")))


def lockstep(pair: dict, order: list[str], prompts, new_tokens: int, batch: int) -> dict[str, Generation]:
    """The generations of both sides of `pair`, stepped in turn (benchmarks/timing.py `lockstep`, `order[0]` first),
    so that every step of one is timed beside a step of the other: a slow spell of the machine falls on both."""
    return in_lockstep({n: pair[n][0].steps(prompts, new_tokens, **adapter_args(pair[n][1], batch)) for n in order})


def adapter_args(kwargs: dict, batch: int) -> dict:
    """A variant's generate() arguments for a batch: a routed export's rows on adapters 0..3 in turn."""
    return {"adapter_ids": [k % 4 for k in range(batch)]} if "adapter_ids" in kwargs else kwargs


def measure_pair(pair: dict, prompt: list[int], alternations: int) -> dict[str, list[dict[str, float]]]:
    """{name: [its measures per alternation]} for two (generator, kwargs): each prefill called in turn, and each
    generation (batch 1 and 8, 32 new tokens) stepped in lockstep with the other's (`lockstep`); which side goes
    first alternates. After a warm-up of both (the arena, prepacked weights, the first shapes)."""
    long_prompt = (prompt * 128)[:128]
    names = list(pair)
    lockstep(pair, names, prompt, 4, 1)
    lockstep(pair, names, [prompt] * 8, 4, 8)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for k in range(alternations):
        order = names if k % 2 == 0 else names[::-1]
        prefill = {}
        for n in order:
            t0 = time.perf_counter()
            pair[n][0].generate(long_prompt, 1, **adapter_args(pair[n][1], 1))
            prefill[n] = (time.perf_counter() - t0) * 1e3
        one = lockstep(pair, order, prompt, 32, 1)
        eight = lockstep(pair, order, [prompt] * 8, 32, 8)
        for n in names:
            runs[n].append(
                dict(zip(METRICS, (prefill[n], one[n].ttft_s * 1e3, one[n].tokens_per_s, eight[n].tokens_per_s)))
            )
    return runs


def seconds(metric: str, values: list[float]) -> list[float]:
    """A measure as time: ms as they are, tok/s inverted (time per token), so that more is always slower."""
    return list(values) if metric.endswith("_ms") else [1.0 / v if v else float("nan") for v in values]


def summarize(pairs: dict[str, list[dict[str, list[dict[str, float]]]]]) -> tuple[dict, dict]:
    """(rows, overheads) from {variant: [a pair's runs, per round]}: each variant's medians (base's over all its
    pairs), and per measure the median of the paired ratios to base - 1, with a 95% interval."""
    base_runs = [r for rounds in pairs.values() for pair in rounds for r in pair["base"]]
    rows = {"base": {m: statistics.median(r[m] for r in base_runs) for m in METRICS}} if base_runs else {}
    over = {}
    for v, rounds in pairs.items():
        mine = [r for pair in rounds for r in pair[v]]
        theirs = [r for pair in rounds for r in pair["base"]]
        rows[v] = {m: statistics.median(r[m] for r in mine) for m in METRICS}
        over[v] = {}
        for m in METRICS:
            case, ref = seconds(m, [r[m] for r in mine]), seconds(m, [r[m] for r in theirs])
            ratio = statistics.median(c / b for c, b in zip(case, ref)) - 1
            over[v][SHORT[m]] = ratio
            over[v][SHORT[m] + "_interval"] = paired_overhead(case, ref)
    return rows, over


def table(model: str, rows: dict, over: dict, args, prompt_tokens: int) -> str:
    def pct(v: str, key: str) -> str:
        return f" ({over[v][key]:+.1%})" if v in over else ""

    pairs = args.rounds * args.alternations
    lines = [
        f"{LABELS[args.backend]}, {args.threads} threads, fp32, greedy; {model}; prompt {prompt_tokens} tokens; each "
        f"variant in a pair with base, {args.alternations} alternations in each of {args.rounds} fresh processes; "
        f"medians; (+x%): median of the {pairs} paired ratios, more time than base",
        "",
        "| variant | prefill 128 (ms) | time to first token (ms) | decode b1 (tok/s) | b1 decode overhead [95%] "
        f"(target <= {TARGET:.0%}) | decode b8 (tok/s per stream) |",
        "|---|---|---|---|---|---|",
    ]
    control = over.get("lora-merged", {}).get("decode_b1")  # the base graph with other weights: 0 but for noise
    trusted = control is None or abs(control) <= TARGET
    for v, r in rows.items():
        verdict = ""
        if v in over:
            lo, hi = over[v]["decode_b1_interval"] or (float("nan"), float("nan"))
            verdict = f"{over[v]['decode_b1']:+.1%} [{lo:+.1%}, {hi:+.1%}] "
            verdict += ("met" if over[v]["decode_b1"] <= TARGET else "missed") if trusted else "no verdict"
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


def pair_worker(args) -> None:
    """One round of one variant (`--pair VARIANT`): base and it, opened from `--work`, measured in turn; JSON out."""
    prompt = json.loads((args.work / "prompt.json").read_text())
    pair = {
        v: open_generator(args.work / f"{v}.onnx", how_to_open(v, args.work), args.threads, args.backend)
        for v in ("base", args.pair)
    }
    print(json.dumps(measure_pair(pair, prompt, args.alternations)))


def exported(model: str, variants: list[str], work: Path) -> list[int]:
    """Export `model`'s variants into `work` (those not there yet) and return the prompt's token ids."""
    if (work / "prompt.json").is_file() and all((work / f"{v}.done").is_file() for v in variants):
        return json.loads((work / "prompt.json").read_text())
    base, prompt = open_lm(model, work)
    for v in variants:
        t0 = time.perf_counter()
        export(v, base, work)
        gc.collect()
        print(f"{model} {v}: exported and checked in {time.perf_counter() - t0:.0f} s", flush=True)
    (work / "prompt.json").write_text(json.dumps(list(prompt)))
    return list(prompt)


def bench_model(model: str, variants: list[str], args) -> None:
    label = Path(model).parent.name if model.endswith(".json") else model
    others = [v for v in variants if v != "base"]
    pairs: dict[str, list[dict]] = {v: [] for v in others}
    with tempfile.TemporaryDirectory(prefix="generate-bench-") as tmp:
        work = args.work / label if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.backend in ONNX_BACKENDS:
            prompt = exported(model, ["base", *others], work)
            for r in range(args.rounds):  # the variants' order rotates round to round
                for v in others[r % len(others) :] + others[: r % len(others)]:
                    cmd = [sys.executable, "-m", "benchmarks.generate", "--pair", v, "--work", str(work)]
                    cmd += ["--threads", str(args.threads), "--alternations", str(args.alternations)]
                    cmd += ["--backend", args.backend]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"{model} {v}: the pair's process failed:\n{done.stderr[-2000:]}")
                    pairs[v].append(json.loads(done.stdout.splitlines()[-1]))
                    print(f"{model} round {r + 1} {v}: {pairs[v][-1][v][-1]}", flush=True)
        else:
            import torch

            torch.set_num_threads(args.threads)
            device = "cuda" if args.backend == "torch-cuda" else "cpu"
            base, prompt = open_lm(model, work)
            reference = TorchGenerator(base, device)
            for r in range(args.rounds):
                for v in others[r % len(others) :] + others[: r % len(others)]:
                    pair = {"base": (reference, {}), v: (TorchGenerator(adapted_variant(v, base), device), {})}
                    pairs[v].append(measure_pair(pair, prompt, args.alternations))
                    del pair
                    gc.collect()
    rows, over = summarize(pairs)
    result = {
        "machine": machine(),
        "model": label,
        "backend": args.backend,
        "prompt_tokens": len(prompt),
        "rounds": args.rounds,
        "alternations": args.alternations,
        "threads": args.threads,
        "rows": rows,
        "overhead_vs_base": over,
        "target_decode_b1": TARGET,
        "pairs": pairs,
    }
    text = table(label, rows, over, args, len(prompt))
    print(text, flush=True)
    name = f"generate_{label}" + ("" if args.backend == "ort" else f"_{args.backend}")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS) + ", or a config.json"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant's pair with base")
    parser.add_argument("--alternations", type=int, default=5, help="paired measures in each of them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="ort", choices=BACKENDS)
    parser.add_argument("--work", type=Path, help="where the exports are kept, per model (default: a temp dir)")
    add_output(parser, Path("out/generate"), type=Path)
    parser.add_argument("--pair", help=argparse.SUPPRESS)  # one round of one variant: the worker process
    args = parser.parse_args(argv)
    if args.pair:
        pair_worker(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    allowed = VARIANTS if args.backend in ONNX_BACKENDS else TORCH_VARIANTS
    unknown = set(variants) - set(allowed)
    if unknown:
        raise SystemExit(f"variants {sorted(unknown)} not on --backend {args.backend}; from: {', '.join(allowed)}")
    if not [v for v in variants if v != "base"]:
        raise SystemExit("--variants: give at least one besides base (each is timed in a pair with it)")
    from benchmarks.harness import missing_backend

    missing = missing_backend(args.backend)  # before any export: a GPU row that cannot run stops here
    if missing:
        raise SystemExit(f"--backend {args.backend}: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)
    for model in filter(None, args.model.split(",")):
        bench_model(model, variants, args)


if __name__ == "__main__":
    main()
