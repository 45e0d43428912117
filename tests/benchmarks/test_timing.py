"""Paired confidence intervals: Student's t quantiles against printed tables, intervals against hand arithmetic."""

from __future__ import annotations

import math

import pytest

from benchmarks.timing import paired_overhead, t_quantile


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [
        (0.975, 1, 12.7062),
        (0.95, 1, 6.3138),
        (0.975, 3, 3.1824),
        (0.975, 4, 2.7764),
        (0.975, 9, 2.2622),
        (0.995, 11, 3.1058),
        (0.975, 30, 2.0423),
        (0.975, 1000, 1.9623),
    ],
)
def test_t_quantile_matches_the_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=6e-4)


def test_interval_from_log_ratios_by_hand():
    """Ratios e^0.08, e^0.12, e^0.08, e^0.12: mean log 0.1, sd 0.02·sqrt(4/3), t(0.975, 3) = 3.182446, so the
    interval is e^(0.1 ± 0.0367477) - 1 = [+6.5296%, +14.6539%]."""
    base = [10.0, 20.0, 5.0, 8.0]  # the machine's speed swings 4x between rounds; the ratios carry the signal
    case = [b * math.exp(x) for b, x in zip(base, [0.08, 0.12, 0.08, 0.12])]
    lo, hi = paired_overhead(case, base)
    assert lo == pytest.approx(0.0652956, abs=1e-5)
    assert hi == pytest.approx(0.1465389, abs=1e-5)


def test_pairing_cancels_the_machine_and_a_constant_ratio_has_no_spread():
    base = [10.0, 14.0, 9.0, 30.0, 11.0]
    lo, hi = paired_overhead([1.05 * b for b in base], base)
    assert lo == pytest.approx(0.05, abs=1e-9) and hi == pytest.approx(0.05, abs=1e-9)


def test_interval_needs_two_paired_rounds():
    assert paired_overhead([1.0], [1.0]) is None
    with pytest.raises(ValueError, match="differ in number"):
        paired_overhead([1.0, 2.0], [1.0])
