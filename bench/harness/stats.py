"""Percentiles, defined once for every benchmark."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Literal

import numpy as np


def percentile(values: Sequence[float], q: float, method: Literal["linear", "lower"] = "linear") -> float:
    """The ``q``-th percentile of ``values`` (numpy's ``method``; ``lower``: the sample at rank
    floor(q / 100 * (n - 1)), never an interpolated value); NaN for no values."""
    return float(np.percentile(values, q, method=method)) if len(values) else math.nan


def median_gap(times: Sequence[float]) -> float | None:
    """The median interval between consecutive ``times``, None for fewer than two."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return statistics.median(gaps) if gaps else None
