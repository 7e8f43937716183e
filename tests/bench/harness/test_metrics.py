"""Run-level metrics from per-request outcomes (bench.serving's tests drive them end to end)."""

from __future__ import annotations

import pytest

from bench.harness.metrics import LatencySummary, RequestOutcome, compute_metrics


def test_tpot_needs_two_tokens() -> None:
    assert RequestOutcome(8, 4, output_tokens=4, ttft_s=0.1, e2el_s=0.4).tpot_s == pytest.approx(0.1)
    assert RequestOutcome(8, 1, output_tokens=1, ttft_s=0.1, e2el_s=0.1).tpot_s is None
    assert RequestOutcome(8, 4, error="boom").tpot_s is None


def test_latency_summary_in_milliseconds() -> None:
    summary = LatencySummary.of_seconds([0.001 * i for i in range(1, 101)])
    assert summary is not None
    assert summary.to_json() == pytest.approx({"mean": 50.5, "median": 50.5, "p95": 95.05, "p99": 99.01})
    assert LatencySummary.of_seconds([]) is None


def test_failed_requests_enter_no_figure() -> None:
    done = RequestOutcome(10, 3, output_tokens=3, ttft_s=0.2, e2el_s=0.6, itls_s=[0.2, 0.2])
    failed = RequestOutcome(50, 3, error="HTTP 500")
    metrics = compute_metrics([failed, done], 2.0)
    assert (metrics.completed, metrics.failed, metrics.total_input_tokens, metrics.total_output_tokens) == (1, 1, 10, 3)
    assert metrics.output_throughput == 1.5 and metrics.total_token_throughput == 6.5
    assert metrics.ttft_ms is not None and metrics.ttft_ms.median == pytest.approx(200.0)
    assert metrics.errors == ["request 0: HTTP 500"] and metrics.output_len_mismatches == 0
    assert compute_metrics([done], 1.0, ignore_eos=False).output_len_mismatches is None
