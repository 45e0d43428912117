"""The latency harness on MiniLM with a tiny grid: reports written, documented keys, missing backends skipped."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.harness import JSON_KEYS


@pytest.mark.slow
def test_bench_writes_reports_and_skips_a_missing_backend(tmp_path, cli):
    run = cli("insert", "--r", "4", "minilm", "-o", "m.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    run = cli(
        "bench",
        "m.adapted.pt2",
        "--backends",
        "ort,ort-cuda,torch",
        "--batch",
        "1",
        "--seq",
        "16",
        "--rounds",
        "2",
        "--calls",
        "2",
        "-o",
        "bench",
        "--json",
        cwd=tmp_path,
    )
    assert run.code == 0, run.stderr
    assert "skipping ort-cuda" in run.stderr
    rows = run.json["results"]
    assert {(r["variant"], r["backend"]) for r in rows} == {
        ("base", "ort"),
        ("houlsby", "ort"),
        ("swappable", "ort"),
        ("base", "torch"),
        ("houlsby", "torch"),
    }
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved == rows
    for row in rows:
        assert set(JSON_KEYS) <= set(row)
        assert row["calls"] == 4 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert len(row["round_ms"]) == 2 and all(row["min_ms"] <= t <= row["max_ms"] for t in row["round_ms"])
        base = next(r for r in rows if r["variant"] == "base" and r["backend"] == row["backend"])
        assert row["overhead"] == pytest.approx(row["median_ms"] / base["median_ms"] - 1, abs=1e-12)
        if row is base:
            assert row["overhead_ci"] is None
            continue
        # two paired rounds: mean log ratio ± t(0.975, 1) = 12.7062 · |difference of the two logs| / 2
        logs = [math.log(c / b) for c, b in zip(row["round_ms"], base["round_ms"])]
        half = 12.7062 * abs(logs[0] - logs[1]) / 2
        mean = sum(logs) / 2
        assert row["overhead_ci"] == pytest.approx([math.exp(mean - half) - 1, math.exp(mean + half) - 1], rel=1e-3)
    assert (tmp_path / "bench" / "results.md").read_text().count("| ort |") == 3
    assert (tmp_path / "bench" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_for_torch_cuda_adds_the_fused_program(tmp_path, cli):
    """Asked for torch CUDA, bench also times `export --fused-pt2`'s program (here on the CPU backend, CUDA skipped)."""
    run = cli("insert", "--r", "4", "--method", "pfeiffer", "minilm", "-o", "m.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    run = cli(
        "bench",
        "m.adapted.pt2",
        "--backends",
        "torch-cuda,torch",
        "--batch",
        "1",
        "--seq",
        "16",
        "--rounds",
        "1",
        "--calls",
        "2",
        "--out",
        "bench",
        "--json",
        cwd=tmp_path,
    )
    assert run.code == 0, run.stderr
    assert "warning: --out is deprecated" in run.stderr  # the earlier spelling still works, for one release
    if "skipping torch-cuda" not in run.stderr:  # a GPU machine: the CUDA rows come too
        assert any(r["backend"] == "torch-cuda" for r in run.json["results"])
    rows = {(r["variant"], r["backend"]) for r in run.json["results"] if r["backend"] == "torch"}
    assert rows == {("base", "torch"), ("pfeiffer", "torch"), ("fused-pt2", "torch")}
    assert (tmp_path / "bench" / "artifacts" / "adapted.fused.pt2").is_file()


@pytest.mark.slow
def test_torch_compile_backend_runs_every_torch_form(tmp_path, small_config):
    """torch.compile (Inductor's C++ backend on the CPU) over the base, one-op-kernel (`surgery::bottleneck`, through
    its fake impl) and folded forms of a small GPT-2: each case compiles, is timed, and gets an overhead with its
    interval. About 8 minutes on 2 busy shared cores, so three cases only (the GPU run takes all of them)."""
    import subprocess
    import sys

    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.latency",
            "--model",
            str(small_config("gpt2")),
            "--grid",
            "1x16",
            "--variants",
            "base,houlsby-kernel,houlsby-folded",
            "--backends",
            "torch-compile",
            "--rounds",
            "3",
            "--calls",
            "2",
            "--threads",
            "1",
            "--target",
            "3",
            "--build-timeout",
            "500",
            "-o",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping" not in proc.stderr, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert {(r["variant"], r["backend"]) for r in rows} == {
        (v, "torch-compile") for v in ("base", "houlsby-kernel", "houlsby-folded")
    }
    assert all(r["overhead_ci"] is not None for r in rows if r["variant"] != "base")
    assert "| torch-compile | 1x16 | houlsby-folded |" in (out / "results.md").read_text()
