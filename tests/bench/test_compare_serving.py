"""The side-by-side serving comparison: what it sends, without starting servers."""

from __future__ import annotations

import pytest

from bench import compare_serving
from bench.workloads import build_workload


def test_every_comparison_differs_in_one_option_only() -> None:
    for name, comparison in compare_serving.COMPARISONS.items():
        (_, base), (_, cand) = comparison.baseline, comparison.candidate
        assert len(base) == len(cand) == 2 and base[0] == cand[0] and base[1] != cand[1], name
        build_workload(comparison.workload, 2, seed=0)  # the workload exists


def test_arguments() -> None:
    args = compare_serving._parse_args(["batching", "--num-requests", "8", "--serve-arg=--max-num-seqs=4"])
    assert (args.comparison, args.num_requests, args.serve_arg) == ("batching", 8, ["--max-num-seqs=4"])
    with pytest.raises(SystemExit):
        compare_serving._parse_args(["nonsense"])


def serving_result(label: str, ttfts: list[float | None]) -> dict:
    """The parts of a bench.serving result that the chart reads; None: a failed request."""
    return {
        "label": label,
        "config": {"model": "m", "concurrency": 8, "request_rate": None},
        "workload": {"name": "rag", "num_requests": len(ttfts)},
        "requests": [{"ttft_ms": t, "tpot_ms": None if t is None else t / 10, "error": "boom" if t is None else None}
                     for t in ttfts],
    }


def test_chart_lays_baseline_and_candidate_over_each_other() -> None:
    report = {"comparison": "batching", "runs": {
        "baseline": {"label": "static batching", "result": serving_result("static batching", [300.0, 100.0, None])},
        "candidate": {"label": "continuous batching", "result": serving_result("continuous batching", [50.0, 70.0])},
    }}
    chart = compare_serving.figure(report)
    assert chart is not None
    assert chart.title == "static batching vs continuous batching: rag, 3 requests, concurrency 8, all at once"
    ttft, tpot = chart.panels
    assert (ttft.xlabel, ttft.style, tpot.xlabel) == ("TTFT (ms)", "step", "TPOT (ms)")
    base, cand = ttft.series
    # Distribution functions over the completed requests only.
    assert (base.label, base.x, base.y) == ("static batching", (100.0, 300.0), (0.5, 1.0))
    assert (cand.label, cand.x) == ("continuous batching", (50.0, 70.0))
