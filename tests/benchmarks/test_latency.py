"""The latency harness on MiniLM with a tiny grid: reports written, documented keys, missing backends skipped."""

from __future__ import annotations

import json

from benchmarks.latency import JSON_KEYS


def test_bench_writes_reports_and_skips_a_missing_backend(tmp_path, cli):
    run = cli("insert", "--r", "4", "minilm", "-o", "m.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    run = cli("bench", "m.adapted.pt2", "--backends", "ort,ort-cuda,torch", "--batch", "1", "--seq", "16",
              "--rounds", "1", "--calls", "2", "--out", "bench", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "skipping backend ort-cuda" in run.stderr
    rows = run.json["results"]
    assert {(r["variant"], r["backend"]) for r in rows} == {
        ("base", "ort"), ("houlsby", "ort"), ("swappable", "ort"), ("base", "torch"), ("houlsby", "torch")
    }
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved == rows
    for row in rows:
        assert set(JSON_KEYS) <= set(row)
        assert row["calls"] == 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["overhead"] is not None
    base = next(r for r in rows if r["variant"] == "base" and r["backend"] == "ort")
    assert base["overhead"] == 0
    assert (tmp_path / "bench" / "results.md").read_text().count("| ort |") == 3
    assert (tmp_path / "bench" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_for_torch_cuda_adds_the_fused_program(tmp_path, cli):
    """Asked for torch CUDA, bench also times `export --fused-pt2`'s program (here on the CPU backend, CUDA skipped)."""
    run = cli("insert", "--r", "4", "--method", "pfeiffer", "minilm", "-o", "m.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    run = cli("bench", "m.adapted.pt2", "--backends", "torch-cuda,torch", "--batch", "1", "--seq", "16",
              "--rounds", "1", "--calls", "2", "--out", "bench", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    if "skipping backend torch-cuda" not in run.stderr:  # a GPU machine: the CUDA rows come too
        assert any(r["backend"] == "torch-cuda" for r in run.json["results"])
    rows = {(r["variant"], r["backend"]) for r in run.json["results"] if r["backend"] == "torch"}
    assert rows == {("base", "torch"), ("pfeiffer", "torch"), ("fused-pt2", "torch")}
    assert (tmp_path / "bench" / "artifacts" / "adapted.fused.pt2").is_file()
