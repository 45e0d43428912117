"""Start-up cost of serving from the runtime: import time, time to a ready session, and peak RSS, before and after.

Each case runs in a fresh process under `/usr/bin/time -f %e %M` (wall seconds, peak RSS in KiB), the two code
trees interleaved round by round, so a slow spell of the machine hits both:

- `session`: `python -c "import the runtime; AdaptedSession(model).load(pack)"`, printing the seconds to the end of
  the import and to a loaded session (`time.perf_counter` from the first line of the program);
- `cli run`: `surgery run model --adapter pack` (random inputs of batch 1, seq 128), the whole command.

`--before` is a git revision of this repository (extracted with `git archive`) or a folder, whose AdaptedSession lives
in `exporters.runtime` (which imports torch); `--after` a checkout with the `runtime` package. Both run in this
interpreter's environment (torch installed; the question is what each loads).

    python -m benchmarks.runtime_import --before 03fd3fe --after . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SESSION = """
import time
t0 = time.perf_counter()
{import_line}
t1 = time.perf_counter()
s = AdaptedSession({model!r})
s.load("p", {pack!r})
t2 = time.perf_counter()
import sys
print(t1 - t0, t2 - t0, "torch" in sys.modules, "transformers" in sys.modules)
"""
IMPORTS = {"before": "from exporters.runtime import AdaptedSession", "after": "from runtime import AdaptedSession"}


def make_model(folder: Path) -> tuple[Path, Path]:
    """MiniLM (pretrained) with Houlsby r=8, exported swappable, and the pack of a second adapted copy."""
    from exporters.swappable import export_swappable
    from surgery.adapters import AdapterSpec
    from surgery.packs import pack_from_model, save_pack
    from surgery.pipeline import open_model, stand_in_adapted

    base = open_model("minilm")
    spec = AdapterSpec("houlsby", r=8)
    models = [stand_in_adapted(base, spec, folder / f"m{k}.adapted.pt2", seed=k, weights_seed=10 + k) for k in (0, 1)]
    model = export_swappable(models[0], folder / "minilm.swappable.onnx").path
    pack = save_pack(pack_from_model(models[1].gm.state_dict(), models[1].manifest), folder / "p1.onnx_adapter")
    return Path(model), Path(pack)


def tree(spec: str, repo: Path, work: Path) -> tuple[Path, str]:
    """A folder of code, and its label: `spec` itself if it is a folder, else revision `spec` of `repo` extracted
    under `work`."""
    if Path(spec).is_dir():
        return Path(spec).resolve(), str(Path(spec).resolve())
    folder = work / "before"
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", spec], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder, f"git revision {spec}"


def revision(folder: Path) -> str:
    """The git revision of a checkout (with `+changes` where its tracked files differ), or its path."""
    head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return str(folder)
    dirty = subprocess.run(["git", "-C", str(folder), "diff", "--quiet", "HEAD"]).returncode != 0
    return f"git revision {head.stdout.strip()}" + (" +changes" if dirty else "")


def timed(command: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in MiB, and stdout of `command` under /usr/bin/time."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        done = subprocess.run(
            ["/usr/bin/time", "-o", report.name, "-f", "%e %M", *command],
            capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} in {cwd} failed: {done.stderr[-2000:]}")
        wall, rss = report.read().split()[-2:]
    return float(wall), int(rss) // 1024, done.stdout


def measure(trees: dict[str, Path], model: Path, pack: Path, rounds: int) -> dict[str, Any]:
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for name, tree in trees.items():
            code = SESSION.format(import_line=IMPORTS[name], model=str(model), pack=str(pack))
            wall, rss, out = timed([sys.executable, "-c", code], tree)
            imported, ready, torch_loaded, hf_loaded = out.split()
            row = rows.setdefault(f"session/{name}", {})
            for key, value in (("import_s", imported), ("ready_s", ready), ("wall_s", wall), ("peak_rss_mib", rss)):
                row.setdefault(key, []).append(float(value))
            row.setdefault("torch_loaded", []).append(torch_loaded == "True")
            row.setdefault("transformers_loaded", []).append(hf_loaded == "True")
            run = [sys.executable, "-m", "cli.main", "run", str(model), "--adapter", str(pack), "--json"]
            wall, rss, _ = timed(run, tree)
            row = rows.setdefault(f"cli run/{name}", {})
            row.setdefault("wall_s", []).append(wall)
            row.setdefault("peak_rss_mib", []).append(rss)
    return rows


def summarize(rows: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for case, values in rows.items():
        out[case] = {}
        for key, xs in values.items():
            if isinstance(xs[0], bool):
                out[case][key] = all(xs) if all(xs) == any(xs) else f"{sum(xs)}/{len(xs)}"
            elif key == "peak_rss_mib":
                out[case][key] = int(statistics.median(xs))
            else:
                out[case][key] = round(statistics.median(xs), 2)
    return out


def markdown(summary: dict[str, dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# Runtime start-up: before and after the torch-free runtime",
        "",
        f"{info['date']}, {info['machine']}; python {info['python']}; {info['rounds']} interleaved rounds, medians.",
        f"Before: {info['before']}; after: {info['after']}.",
        f"Model: {info['model']}. Command: `{info['command']}`.",
        "",
        "| case | import s | session ready s | process wall s | peak RSS MiB | torch loaded | transformers loaded |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, s in summary.items():
        cells = [s.get(k, "") for k in ("import_s", "ready_s", "wall_s", "peak_rss_mib")]
        flags = [s.get(k, "") for k in ("torch_loaded", "transformers_loaded")]
        lines.append(f"| {case} | " + " | ".join(map(str, [*cells, *flags])) + " |")
    lines += [
        "",
        "`session`: `python -c` importing AdaptedSession (before: `exporters.runtime`; after: `runtime`), opening the",
        "swappable export and loading one pack; `cli run`: `surgery run MODEL --adapter PACK --json` (batch 1, seq",
        "128). Process wall and peak RSS from `/usr/bin/time -f '%e %M'`. Both trees ran in the same environment",
        "(torch installed), so the difference is what each imports.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision or folder with exporters.runtime (torch)")
    parser.add_argument("--after", type=Path, default=Path("."), help="checkout with the runtime package")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/runtime_import"))
    args = parser.parse_args()
    from surgery.quiet import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="runtime-import-") as folder:
        before, before_label = tree(args.before, args.after, Path(folder))
        trees = {"before": before, "after": args.after.resolve()}
        model, pack = make_model(Path(folder))
        rows = measure(trees, model, pack, args.rounds)
    import onnxruntime

    info = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "rounds": args.rounds,
        "before": before_label,
        "after": revision(args.after.resolve()),
        "model": "pretrained MiniLM (all-MiniLM-L6-v2), Houlsby r=8, swappable, one .onnx_adapter pack",
        "command": "python -m benchmarks.runtime_import " + " ".join(sys.argv[1:]),
    }
    summary = summarize(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({**info, "summary": summary, "runs": rows}, indent=1))
    args.output.with_suffix(".md").write_text(markdown(summary, info))
    print(markdown(summary, info))


if __name__ == "__main__":
    main()
