"""bench.serving with two client processes against real processes: ``loomserve gateway`` and
``loomserve scheduler`` with the echo worker in place of the model (as bench.gateway_cost runs them)."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator

import pytest

from bench.gateway_cost import GatewayRunOptions, start_stack
from bench.harness.processes import ProcessGroup
from bench.harness.readiness import free_port
from bench.serving import BenchConfig, compute_metrics, run_benchmark
from bench.workloads import BenchRequest, Workload


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with ProcessGroup() as group:
        yield start_stack(group, free_port(), 4, None, GatewayRunOptions())


def test_two_client_processes_share_the_workload(base_url: str) -> None:
    # Every request of its own lengths: the merged outcomes show whether they came back in order.
    requests = tuple(BenchRequest(list(range(100, 110 + i)), 10 + i, 4 + i) for i in range(9))
    config = BenchConfig(Workload("mixed", requests), base_url=base_url, concurrency=3, client_processes=2)
    result = asyncio.run(run_benchmark(config))
    m = result.metrics

    assert (m.completed, m.failed) == (9, 0), m.errors
    assert len(result.outcomes) == len(requests)
    for request, outcome in zip(requests, result.outcomes, strict=True):
        # Both counts come from the server's usage chunk of this very request.
        assert (outcome.prompt_len, outcome.output_tokens) == (request.prompt_len, request.output_len)
        assert outcome.e2el_s is not None
        # Each request's send and [DONE] lie inside the run, which spans readings of both processes.
        assert outcome.e2el_s <= m.duration_s
    assert m == compute_metrics(result.outcomes, m.duration_s)
    assert result.window[1] - result.window[0] == pytest.approx(m.duration_s)
    assert m.total_output_tokens == sum(r.output_len for r in requests)
    assert m.output_len_mismatches == 0

    summary = result.to_json()
    assert summary["config"]["client_processes"] == 2
    assert result.client_cpu_s > 0
    assert summary["metrics"]["client_cpu_us_per_output_token"] == pytest.approx(
        result.client_cpu_s * 1e6 / m.total_output_tokens)
    assert multiprocessing.active_children() == []
