"""The harness's overheads, intervals, verdicts and reports on rows whose numbers are known."""

from __future__ import annotations

import math

import pytest

from benchmarks.harness import Row, markdown, overheads, verdict

MACHINE = {"cpu": "x", "cores": "2", "gpu": "none", "torch": "t", "onnxruntime": "o"}


def _row(variant: str, backend: str, median: float, rounds: list[float]) -> Row:
    return Row(
        "m",
        variant,
        backend,
        1,
        128,
        median,
        median,
        median,
        min(rounds),
        max(rounds),
        10,
        None,
        None,
        rounds,
        2,
        MACHINE,
    )


def test_overhead_and_interval_against_their_own_base():
    """Overhead = median / base median - 1 on the same backend; the interval from the paired round medians:
    here ratios 1.2, 1.25, 1.2, 1.25 (log mean 0.2008, sd 0.02357, t(0.975, 3) = 3.1824)."""
    base = _row("base", "torch", 10.0, [10.0, 8.0, 12.0, 16.0])
    adapted = _row("houlsby", "torch", 12.3, [12.0, 10.0, 14.4, 20.0])
    other_base = _row("base", "ort", 5.0, [5.0, 5.0, 5.0, 5.0])
    rows = [base, adapted, other_base]
    overheads(rows)
    assert adapted.overhead == pytest.approx(0.23)
    assert base.overhead == 0 and base.overhead_ci is None
    logs = [math.log(1.2), math.log(1.25), math.log(1.2), math.log(1.25)]
    mean = sum(logs) / 4
    half = 3.182446 * math.sqrt(sum((x - mean) ** 2 for x in logs) / 3) / 2
    assert adapted.overhead_ci == pytest.approx([math.exp(mean - half) - 1, math.exp(mean + half) - 1], abs=1e-5)


def test_a_variant_without_a_base_on_its_backend_has_no_overhead():
    rows = [_row("base", "ort", 5.0, [5.0, 5.0]), _row("houlsby", "torch", 6.0, [6.0, 6.0])]
    overheads(rows)
    assert rows[1].overhead is None and rows[1].overhead_ci is None


@pytest.mark.parametrize(
    ("ci", "want"),
    [
        ([0.01, 0.029], "met"),
        ([0.031, 0.05], "missed"),
        ([0.02, 0.04], "within noise"),
        (None, "met"),
    ],
)
def test_verdict_reads_the_interval(ci, want):
    row = _row("houlsby", "torch", 10.25, [10.0, 10.5])
    row.overhead, row.overhead_ci = 0.025, ci
    assert verdict(row, 0.03) == want


def test_markdown_shows_the_interval_and_the_verdict():
    rows = [
        _row("base", "torch-cuda-graphs", 5.0, [5.0, 5.0, 5.0]),
        _row("houlsby-kernel", "torch-cuda-graphs", 5.4, [5.4, 5.45, 5.35]),
    ]
    overheads(rows)
    text = markdown(rows, "t", target=0.03)
    line = next(x for x in text.splitlines() if "houlsby-kernel" in x)
    assert "+8.0% [" in line and line.rstrip().endswith("missed |")
