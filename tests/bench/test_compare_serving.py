"""The side-by-side serving comparison: what it sends, without starting servers."""

from __future__ import annotations

import pytest

from bench import compare_serving
from bench.workloads import build_workload


def test_outputs_are_capped_and_the_cap_is_recorded() -> None:
    workload = build_workload("rag", 20, seed=0)
    capped = compare_serving.cap_outputs(workload, 16)
    assert [r.output_len for r in capped.requests] == [min(r.output_len, 16) for r in workload.requests]
    assert [r.prompt for r in capped.requests] == [r.prompt for r in workload.requests]
    assert capped.params["max_output_len"] == 16
    assert compare_serving.cap_outputs(workload, None) is workload


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
