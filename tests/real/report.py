"""The real tier's figures as a Markdown table (`pytest -m real --real-results X.json` writes X.md with it)."""

from __future__ import annotations

import platform


def _pair(fig: dict | None) -> str:
    if not fig:
        return "-"
    return f"{fig['abs']:.1e} / {fig['rel']:.1e} {'ok' if fig['abs'] <= fig['limit'] else '**over**'}"


def markdown(results: dict[str, dict]) -> str:
    import onnxruntime
    import torch
    import transformers

    lines = [
        "# Real checkpoints through the whole path",
        "",
        f"`make real-results` (pytest -m real): torch {torch.__version__}, transformers {transformers.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {platform.machine()}, {platform.python_version()}. Houlsby r=8 with "
        "default settings, stand-in adapter weights; each output compared with torch on a padded 2x40 batch over "
        "unpadded positions: max |diff| / that divided by max |torch|, against atol 1e-4 + rtol 1e-4 x max |torch|. "
        "Times are seconds of the CLI step, load and capture included: wall / CPU (user + system), the CPU figure "
        "holds better on a shared 2-core machine; RSS is `/usr/bin/time -f %M` of that step, in MB.",
        "",
        "| checkpoint | type | L x d | weights MB | sites | params (formula) | baked abs / rel | swappable abs / rel "
        "| LoRA merge abs / rel | insert s | export s (RSS) | swappable export s (RSS) | peak RSS MB | failed step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        steps = r.get("steps", {})
        failed = [f"{s}: {f['error']}" for s, f in steps.items() if f.get("exit")]
        params = f"{r['params']:,} ({r['formula']:,})" if "params" in r else "-"

        def sec(step: str) -> str:
            f = steps.get(step)
            if not f or not f.get("rss_mb"):
                return "-"
            cpu = f" / {f['cpu_s']:.0f}" if f.get("cpu_s") is not None else ""
            return f"{f['seconds']:.0f}{cpu} ({f['rss_mb']:.0f})"

        peak = max((f.get("rss_mb") or 0 for f in steps.values()), default=0)
        lines.append(
            f"| {name} | {r['model_type']} | {r['layers']} x {r['d_model']} | {r.get('file_mb', '-')} "
            f"| {r.get('sites', '-')} "
            f"| {params} | {_pair(r.get('baked'))} | {_pair(r.get('swappable'))} | {_pair(r.get('lora_merge'))} "
            f"| {sec('insert')} | {sec('export')} | {sec('export-swappable')} | {peak:.0f} "
            f"| {'; '.join(failed).replace('|', '/') or '-'} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m tests.real.report RUN.json [RUN.json ...] OUT.json: several runs' figures (e.g. one checkpoint per
    # run, `-k NAME`) merged into OUT.json and OUT.md
    import json
    import sys
    from pathlib import Path

    *runs, out = sys.argv[1:]
    merged: dict[str, dict] = {}
    for run in runs:
        merged.update(json.loads(Path(run).read_text()))
    Path(out).write_text(json.dumps(merged, indent=1) + "\n")
    Path(out).with_suffix(".md").write_text(markdown(merged))
