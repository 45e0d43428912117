"""ONNX-level forms of the baked Houlsby export, each exact in algebra, timed in pairs against base on the CPU.

    python -m benchmarks.cpu_forms [--threads 2] [--runs 300] [--rounds 2] [-o benchmarks/results/cpu_forms]

The pretrained MiniLM and Houlsby r=8 on it (12 bottlenecks, relu, distinct random stand-in weights), batch 1 x
sequence 128. `base` and `export` are the files `surgery export` writes (surgery/fuse.py: the 6 attention outputs as
ConcatBottlenecks, the 6 feed-forward outputs as a GEMM, σ, MatMul and Add). `fused` is the same export with no
ConcatBottleneck (every bottleneck: `lin = MatMul(x, W) + b`, `Gemm(lin2d, W_down, b_down') -> σ -> MatMul(W_up) ->
Add(lin2d)`, the export's form from the morning of 2026-11-28), and the other forms rewrite `fused`'s graph:
- `gemm-c`: the up-projection and the residual as one Gemm whose C input is the residual (the export's form before
  2026-11-28: ORT's Gemm copies C into its output on one thread first);
- `flat`: no reshapes: MatMul and Add on the 3-D activations throughout;
- `kcat`: where the projection is no wider at its input than at its output (the attention output projection, not
  the feed-forward's), its GEMM also takes the bottleneck: z = x (W W_down) + (b W_down + b_down) is a GEMM of the
  projection's input, and y = [x | σ(z)] [W ; W_up] + b one GEMM over a K of d_in + r; the up-projection's
  separate pass over the output is gone, a Concat copies the input. Other bottlenecks stay as in `fused`. This is
  what `export` writes, made here at the ONNX level.
Each form is run in ONNX Runtime against `export` on random tokens before any timing, and refused unless it agrees
(surgery/parity.py's tolerance) and differs from `base`. Timing: each (base, form) pair in its own process, the two
sessions called in turn (spinning off: DESIGN.md), `--runs` calls after 20 warm-up rounds; the overhead is the median
of the paired per-call ratios, with a 95% interval (benchmarks/timing.py). `--rounds` repeats every pair, the order of
the forms rotated, and the table gives each round. Writes cpu_forms.json and cpu_forms.md into --output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from runtime.slots import drop_dead
from benchmarks.args import add_output

FORMS = ("export", "fused", "gemm-c", "flat", "kcat")  # `export` as written; the rest made from `fused`


def feeds_for(session: Any, batch: int = 1, seq: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    every = {
        "input_ids": rng.integers(0, 1000, (batch, seq)),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    return {i.name: every[i.name] for i in session.get_inputs()}


# ------------------------------------------------------------------------------------------------------- the forms


def _bottlenecks(graph: Any) -> list[dict[str, Any]]:
    """Each exported bottleneck's nodes, found from its down-projection Gemm (surgery/fuse.py's form)."""
    from exporters.onnx import wiring

    prod, users = wiring(graph)
    found = []
    for down in (n for n in graph.node if n.op_type == "Gemm" and n.input[1].endswith(".down_w")):
        view = prod[down.input[0]]
        lin = prod[view.input[0]]
        (act,) = users[down.output[0]]
        (up,) = users[act.output[0]]
        (add,) = users[up.output[0]]
        (back,) = users[add.output[0]]
        assert view.op_type == back.op_type == "Reshape" and up.op_type == "MatMul" and add.op_type == "Add", down.name
        mm = prod.get(lin.input[0]) if lin.op_type == "Add" else None
        found.append(dict(down=down, view=view, lin=lin, mm=mm, act=act, up=up, add=add, back=back))
    return found


def _replace(graph: Any, old: list[Any], new: list[Any]) -> None:
    """Put `new` where the first of `old` was, and drop `old`."""
    from onnx import helper

    at = min(list(graph.node).index(n) for n in old)
    for n in old:
        graph.node.remove(n)
    for n in reversed(new):
        graph.node.insert(at, n if not isinstance(n, tuple) else helper.make_node(*n))


def rewrite(model: Any, form: str) -> Any:
    """`model` (the baked export, an onnx.ModelProto, changed in place) in `form`."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def add(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    for k, b in enumerate(_bottlenecks(graph)):
        act = helper.make_node(b["act"].op_type, [f"f{k}.z"], [f"f{k}.h"])
        act.attribute.extend(b["act"].attribute)
        if form == "gemm-c":
            node = ("Gemm", [b["act"].output[0], b["up"].input[1], b["view"].output[0]], [b["add"].output[0]])
            _replace(graph, [b["up"], b["add"]], [node])
        elif form == "flat":
            x = b["view"].input[0]
            nodes = [
                ("MatMul", [x, b["down"].input[1]], [f"f{k}.zm"]),
                ("Add", [f"f{k}.zm", b["down"].input[2]], [f"f{k}.z"]),
                act,
                ("MatMul", [f"f{k}.h", b["up"].input[1]], [f"f{k}.u"]),
                ("Add", [x, f"f{k}.u"], [b["back"].output[0]]),
            ]
            _replace(graph, [b["back"]], nodes)
        elif form == "kcat":
            mm, lin = b["mm"], b["lin"]
            if mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits or lin.input[1] not in inits:
                continue
            w, bias = array(mm.input[1]), array(lin.input[1])
            if w.shape[0] > w.shape[1]:
                continue  # a wider input (the feed-forward's): z from it would cost more than the GEMM it saves
            down_w, down_b, up_w = (array(b[n].input[i]) for n, i in (("down", 1), ("down", 2), ("up", 1)))
            x2 = f"f{k}.x2"
            nodes = [
                ("Reshape", [mm.input[0], add(f"f{k}.shape", np.array([-1, w.shape[0]], np.int64))], [x2]),
                ("Gemm", [x2, add(f"f{k}.wz", w @ down_w), add(f"f{k}.bz", bias @ down_w + down_b)], [f"f{k}.z"]),
                act,
                helper.make_node("Concat", [x2, f"f{k}.h"], [f"f{k}.cat"], axis=1),
                ("Gemm", [f"f{k}.cat", add(f"f{k}.w", np.concatenate([w, up_w])), lin.input[1]], [b["add"].output[0]]),
            ]
            _replace(graph, [b["up"], b["add"]], nodes)
        elif form != "export":
            raise ValueError(f"form {form!r}: one of {', '.join(FORMS)}")
    drop_dead(graph)
    return model


def write_forms(export: Path, fused: Path, base: Path, out: Path, forms: tuple[str, ...] = FORMS) -> dict[str, Path]:
    """Each form (`export` itself, the others made from `fused`) in `out`, checked in ORT against `export` (and
    against `base`, which it must not equal); raises SurgeryError for a form that disagrees."""
    import onnx

    from exporters.verify import ort_session
    from surgery.errors import SurgeryError
    import torch

    from surgery.parity import tolerances

    atol, rtol = tolerances(torch.float32)
    reference = ort_session(export)
    feeds = feeds_for(reference, batch=2, seq=37, seed=1)
    want = reference.run(None, feeds)[0]
    base_out = ort_session(base).run(None, feeds)[0]
    paths = {}
    for form in forms:
        path = export if form == "export" else out / f"{form}.onnx"
        if form != "export":
            onnx.save(rewrite(onnx.load(str(fused)), "export" if form == "fused" else form), str(path))
        got = ort_session(path).run(None, feeds)[0]
        diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
        if diff > atol + rtol * scale or np.abs(got - base_out).max() <= atol + rtol * scale:
            raise SurgeryError(f"form {form}: {diff:.2e} from the export (max|out| {scale:.2f}), or equal to base")
        paths[form] = path
    return paths


def export_unconcatenated(adapted_pt2: Path, out: Path) -> Path:
    """The baked export of an .adapted.pt2 with every bottleneck fused apart from its projection (no concat)."""
    from exporters.onnx import export_onnx
    from surgery.fuse import fused_copy
    from surgery.pipeline import open_model

    adapted = open_model(str(adapted_pt2))
    gm = fused_copy(adapted.gm, adapted.manifest, concat=False)
    return export_onnx(gm, adapted.signature, out, fuse=False).path


# ---------------------------------------------------------------------------------------------------------- timing


def pair(base: Path, form: Path, threads: int, runs: int) -> dict[str, Any]:
    """base and form called in turn in this process; the form's Timing against base, as JSON."""
    from benchmarks.timing import alternate
    from exporters.verify import ort_session

    feeds = feeds_for(ort_session(base))
    timings = alternate({"base": base, "form": form}, feeds, runs=runs, warmup=20, threads=threads)
    return {"base_ms": round(timings[0].median_ms, 3), **timings[1].to_json()}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Houlsby r=8 on MiniLM, ONNX forms against base, ONNX Runtime CPU",
        "",
        f"batch 1 x seq 128, {result['threads']} threads; each (base, form) pair in its own process, called in turn "
        f"{result['runs']} times after 20 warm-up rounds, spinning off. {m['cpu']}, {m['cores']} cores, onnxruntime "
        f"{m['onnxruntime']}. Overhead: median of paired per-call ratios to base [95% interval], per round.",
        "",
        "| form | " + " | ".join(f"round {r + 1}" for r in range(result["rounds"])) + " | median of rounds |",
        "|---|" + "---|" * (result["rounds"] + 1),
    ]
    for form, rows in result["timings"].items():
        cells = [f"{r['ratio_to_first'] - 1:+.1%} [{r['interval'][0]:+.1%}, {r['interval'][1]:+.1%}]" for r in rows]
        middle = statistics.median(r["ratio_to_first"] - 1 for r in rows)
        lines.append(f"| {form} | " + " | ".join(cells) + f" | {middle:+.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--forms", default=",".join(FORMS))
    add_output(parser, Path("out/cpu_forms"), type=Path)
    parser.add_argument("--work", type=Path, help="where base.onnx and houlsby.onnx are, or go (default: a temp dir)")
    parser.add_argument("--pair", nargs=2, type=Path, help=argparse.SUPPRESS)  # one timed pair: the worker process
    args = parser.parse_args(argv)
    if args.pair:
        print(json.dumps(pair(*args.pair, args.threads, args.runs)))
        return
    from benchmarks.cpu_overhead import prepare
    from benchmarks.timing import machine

    work = args.work or Path(tempfile.mkdtemp(prefix="cpu-forms-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "houlsby.onnx").is_file():
        prepare(work)
    if not (work / "unconcat.onnx").is_file():
        export_unconcatenated(work / "houlsby.adapted.pt2", work / "unconcat.onnx")
    forms = tuple(args.forms.split(","))
    paths = write_forms(work / "houlsby.onnx", work / "unconcat.onnx", work / "base.onnx", work, forms)
    timings: dict[str, list[dict[str, Any]]] = {form: [] for form in forms}
    order = list(forms)
    for _ in range(args.rounds):
        for form in order:
            cmd = [sys.executable, "-m", "benchmarks.cpu_forms", "--pair", str(work / "base.onnx"), str(paths[form])]
            cmd += ["--threads", str(args.threads), "--runs", str(args.runs)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            timings[form].append(row)
            print(form, json.dumps(row), flush=True)
        order = order[1:] + order[:1]
    result = {"machine": machine(), "threads": args.threads, "runs": args.runs, "rounds": args.rounds}
    result["timings"] = timings
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_forms.json").write_text(json.dumps(result, indent=1))
    (args.out / "cpu_forms.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
