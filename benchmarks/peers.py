"""This tool's generation loop against onnxruntime-genai's on the same checkpoint, paired.

    pip install -e '.[peers]'   # onnxruntime-genai 0.18: its model builder and its generation loop
    python -m benchmarks.peers [--model smollm2-135m] [--threads 2] [--alternations 20] [--work DIR] [-o DIR]

The real checkpoint of surgery/zoo.py (SmolLM2-135M: its GGUF, dequantized to fp32 by transformers) three ways:
- `genai`: onnxruntime-genai's builder model of it (`onnxruntime_genai.models.builder -p fp32 -e cpu`, from the same
  fp32 weights saved as a Hugging Face folder), run by `og.Generator`;
- `surgery base` and `surgery houlsby` (r=8, random stand-in weights, baked): this tool's exports of the checkpoint
  with `--task causal-lm` (benchmarks/generate.py's, kept in `--work` and shared with it), run by
  `exporters.runtime.Generator`.
All three in one process on the one ONNX Runtime both packages load, each session with `--threads` intra-op threads
and spinning off (onnxruntime-genai's through its genai_config.json, which takes session config entries by name), so
neither engine's idle thread pool spins against the other's. Each alternation runs one greedy generation of 32 new
tokens from the prompt per engine, the three in lockstep (one step of each in turn, the order rotated from
alternation to alternation), after two warm-up rounds, so that a slow spell of this noisy machine falls on all
three; a generation's time to first token is its prefill and first token, its decode speed the 31 steps after it,
each from its own steps' times (the same split both loops make). Each engine's figure against genai's is
the median of the ratios within an alternation, with a 95% interval (benchmarks/timing.py). The tokens of `surgery
base` and `genai` are compared: the same weights, so the same greedy tokens (fp32 rounding aside).
Writes peers_MODEL.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from benchmarks.generate import PROMPT, exported
from benchmarks.timing import lockstep as in_lockstep
from benchmarks.timing import machine, paired_overhead
from exporters.runtime import Generation, Generator
from benchmarks.args import add_output

NEW_TOKENS = 32


def hf_folder(model: str, out: Path) -> Path:
    """The checkpoint's fp32 weights and tokenizer as a Hugging Face folder (the builder's input)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.zoo import fetch

    gguf = fetch(model)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized already: the folder holds plain fp32 weights
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


def genai_model(hf: Path, out: Path, threads: int) -> Path:
    """onnxruntime-genai's builder model of `hf` (fp32, cpu), its sessions set to `threads` and no spinning."""
    if not (out / "genai_config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp)]
        cmd += ["-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode:
            raise SystemExit(f"onnxruntime-genai's builder failed on {hf}:\n{built.stderr[-2000:]}")
        tmp.rename(out)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"].update(
        {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "session.intra_op.allow_spinning": "0"}
    )
    config_path.write_text(json.dumps(config, indent=4))
    return out


class GenaiEngine:
    """Greedy generation through onnxruntime-genai's own loop, one token per step, each step timed alone."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))

    def steps(self, prompt: list[int], new_tokens: int) -> Iterator[Generation]:
        """As `Generator.steps`: the Generation after each token, its times those of genai's own calls."""
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        gen = og.Generator(self.model, params)  # its cache buffers: set-up, as Generator's are, not timed
        out = Generation(tokens=[[]])
        start = time.perf_counter()
        gen.append_tokens(prompt)  # the prefill, timed with the first token
        while not gen.is_done() and out.steps < new_tokens:
            if out.steps:
                start = time.perf_counter()
            gen.generate_next_token()  # the first: a token from the prefill's logits; then one decode step each
            out.tokens[0].append(int(gen.get_next_tokens()[0]))
            out.count_step(time.perf_counter() - start)
            yield out


def lockstep(engines: dict[str, Any], order: list[str], prompt: list[int]) -> dict[str, dict[str, Any]]:
    """One generation per engine, stepped in turn (benchmarks/timing.py `lockstep`, in `order`), so that a slow
    spell of the machine falls on every engine's steps alike; each one's figures from its own steps' times."""
    outs = in_lockstep({n: engines[n].steps(prompt, NEW_TOKENS) for n in order})
    return {
        n: {"ttft_ms": g.ttft_s * 1e3, "decode_tok_s": g.tokens_per_s, "tokens": g.tokens[0]} for n, g in outs.items()
    }


def alternate(engines: dict[str, Any], prompt: list[int], alternations: int) -> dict[str, list[dict[str, Any]]]:
    """{engine: [one generation per alternation]}, in lockstep, the engines' order rotated each time, after 2
    warm-up rounds."""
    names = list(engines)
    for _ in range(2):
        lockstep(engines, names, prompt)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for k in range(alternations):
        outs = lockstep(engines, names[k % len(names) :] + names[: k % len(names)], prompt)
        for n in names:
            runs[n].append(outs[n])
    return runs


def against(runs: dict[str, list[dict[str, Any]]], reference: str = "genai") -> dict[str, dict[str, Any]]:
    """Each engine's medians, and its time per first token and per decoded token against `reference`'s in the same
    alternation: median of the ratios - 1 (more time: slower), with a 95% interval."""
    ref = runs[reference]
    out = {}
    for name, mine in runs.items():
        row = {k: statistics.median(r[k] for r in mine) for k in ("ttft_ms", "decode_tok_s")}
        for key, seconds in (("ttft", lambda r: r["ttft_ms"]), ("decode", lambda r: 1 / r["decode_tok_s"])):
            case, base = [seconds(r) for r in mine], [seconds(r) for r in ref]
            row[f"{key}_vs_{reference}"] = statistics.median(c / b for c, b in zip(case, base)) - 1
            row[f"{key}_interval"] = paired_overhead(case, base)
        out[name] = row
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# Generation against onnxruntime-genai {result['genai_version']}: {result['model']}, fp32, ONNX Runtime CPU",
        "",
        f"Greedy, {NEW_TOKENS} new tokens from a {result['prompt_tokens']}-token prompt; {result['threads']} threads "
        f"per session, spinning off; the engines in one process, in turn, {result['alternations']} alternations after "
        f"2 warm-up rounds. {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}. (+x%): median of the "
        "paired ratios to genai, more time than genai [95% interval].",
        "",
        "| engine | time to first token (ms) | decode (tok/s) | time per decoded token vs genai |",
        "|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lo, hi = r["decode_interval"] or (float("nan"), float("nan"))
        vs = f"{r['decode_vs_genai']:+.1%} [{lo:+.1%}, {hi:+.1%}]" if name != "genai" else ""
        ttft = f"{r['ttft_ms']:.1f}" + (f" ({r['ttft_vs_genai']:+.1%})" if name != "genai" else "")
        lines.append(f"| {name} | {ttft} | {r['decode_tok_s']:.1f} | {vs} |")
    same = result["same_tokens"]
    lines += ["", f"surgery base and genai gave {'the same' if same else 'different'} {NEW_TOKENS} tokens."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a real checkpoint of surgery/zoo.py")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alternations", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("out/generate-work"), help="exports, shared with generate")
    add_output(parser, Path("out/peers"), type=Path)
    args = parser.parse_args(argv)
    try:
        import onnxruntime_genai
    except ImportError:
        raise SystemExit("onnxruntime-genai is not installed: pip install -e '.[peers]'") from None
    from surgery.zoo import CHECKPOINTS

    if args.model not in CHECKPOINTS:
        raise SystemExit(f"--model {args.model}: a real checkpoint of surgery/zoo.py ({', '.join(CHECKPOINTS)})")
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    prompt = exported(args.model, ["base", "houlsby"], work)
    folder = genai_model(hf_folder(args.model, work / "hf"), work / "genai", args.threads)
    engines = {
        "genai": GenaiEngine(folder),
        "surgery base": Generator(work / "base.onnx", threads=args.threads, spinning=False),
        "surgery houlsby": Generator(work / "houlsby.onnx", threads=args.threads, spinning=False),
    }
    runs = alternate(engines, prompt, args.alternations)
    result = {
        "machine": machine(),
        "model": args.model,
        "genai_version": onnxruntime_genai.__version__,
        "prompt": PROMPT,
        "prompt_tokens": len(prompt),
        "threads": args.threads,
        "alternations": args.alternations,
        "rows": against(runs),
        "same_tokens": runs["genai"][0]["tokens"] == runs["surgery base"][0]["tokens"],
        "tokens": {n: r[0]["tokens"] for n, r in runs.items()},
        "runs": {n: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for n, rs in runs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"peers_{args.model}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / f"peers_{args.model}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
