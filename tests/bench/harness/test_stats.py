"""Percentiles as every benchmark takes them."""

from __future__ import annotations

import math

import pytest

from bench.harness.stats import median_gap, percentile


def test_linear_percentile_interpolates() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5  # the mean of the two middle samples, as statistics.median
    assert percentile(values, 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))


def test_lower_percentile_is_a_sample() -> None:
    values = list(range(1, 11))  # ranks 0..9: floor(0.9 * 9) = 8
    assert percentile(values, 90, method="lower") == 9
    assert percentile(values[:5], 90, method="lower") == 4  # floor(0.9 * 4) = 3


def test_median_gap() -> None:
    assert median_gap([0.0, 1.0, 1.5, 4.0]) == 1.0
    assert median_gap([1.0]) is None and median_gap([]) is None
