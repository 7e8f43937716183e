"""Gateway metrics: names in the exposition, per-tenant cost arithmetic, scheduler-fed counters,
and the sum over several gateway processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from loomserve.gateway.metrics import (
    E2E_BUCKETS,
    MULTIPROC_DIR_ENV,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    GatewayMetrics,
    SchedulerSnapshot,
    time_per_output_token,
)
from loomserve.shared import messages as m
from tests.exposition import SampleKey, exposed_samples

ALL_METRICS = [
    "loomserve_requests_total",
    "loomserve_ttft_seconds",
    "loomserve_tpot_seconds",
    "loomserve_e2e_latency_seconds",
    "loomserve_prompt_tokens_total",
    "loomserve_completion_tokens_total",
    "loomserve_cost_usd_total",
    "loomserve_response_cache_hits_total",
    "loomserve_response_cache_misses_total",
    "loomserve_response_cache_errors_total",
    "loomserve_rate_limit_rejections_total",
    "loomserve_queue_depth",
    "loomserve_running_sequences",
    "loomserve_kv_blocks_used",
    "loomserve_kv_blocks_total",
    "loomserve_prefix_cache_queries_total",
    "loomserve_prefix_cache_hits_total",
    "loomserve_preemptions_total",
    "loomserve_engine_steps_total",
    "loomserve_scheduled_tokens_total",
    "loomserve_parallel_sampling_forks_total",
    "loomserve_kv_block_copies_total",
]


def samples(metrics: GatewayMetrics) -> dict[SampleKey, float]:
    """Every sample of the text exposition, parsed back: (name, sorted labels) -> value."""
    body, _ = metrics.metrics_response()
    return exposed_samples(body.decode())


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_exposition_holds_every_metric_after_observations() -> None:
    g = GatewayMetrics(price_per_1m_input_usd=0.5, price_per_1m_output_usd=1.5)
    g.observe_request("/v1/chat/completions", 200, e2e_s=2.0, ttft_s=0.25, tpot_s=0.02)
    g.observe_tokens("acme", 100, 50)
    g.observe_cache_lookup(True)
    g.observe_cache_lookup(False)
    g.observe_cache_error("get")
    g.observe_rate_limit_rejection("acme", "tokens_per_minute")
    g.update_from_status(SchedulerSnapshot(num_waiting=3, num_running=5, num_free_blocks=70, num_total_blocks=100,
                                           prefix_cache_queries=1000, prefix_cache_hits=640,
                                           num_preemptions=2, num_steps=40, num_scheduled_tokens=5000,
                                           num_forks=3, num_block_copies=6))
    body, content_type = g.metrics_response()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for name in ALL_METRICS:
        assert f"\n{name}" in text, name
    s = samples(g)
    assert s[("loomserve_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert s[("loomserve_ttft_seconds_count", ())] == 1
    assert s[("loomserve_ttft_seconds_sum", ())] == 0.25
    assert s[("loomserve_tpot_seconds_sum", ())] == 0.02
    assert s[("loomserve_e2e_latency_seconds_sum", ())] == 2.0
    assert s[("loomserve_response_cache_hits_total", ())] == 1
    assert s[("loomserve_response_cache_misses_total", ())] == 1
    assert s[("loomserve_response_cache_errors_total", (("op", "get"),))] == 1
    assert s[("loomserve_rate_limit_rejections_total", (("limit", "tokens_per_minute"), ("tenant", "acme")))] == 1
    assert s[("loomserve_queue_depth", ())] == 3
    assert s[("loomserve_running_sequences", ())] == 5
    assert s[("loomserve_kv_blocks_used", ())] == 30
    assert s[("loomserve_kv_blocks_total", ())] == 100
    assert s[("loomserve_prefix_cache_queries_total", ())] == 1000
    assert s[("loomserve_prefix_cache_hits_total", ())] == 640
    assert s[("loomserve_preemptions_total", ())] == 2
    assert s[("loomserve_engine_steps_total", ())] == 40
    assert s[("loomserve_scheduled_tokens_total", ())] == 5000
    assert s[("loomserve_parallel_sampling_forks_total", ())] == 3
    assert s[("loomserve_kv_block_copies_total", ())] == 6


def test_metrics_live_on_their_own_registry() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()  # a second gateway must not clash over names
    a.observe_request("/v1/completions", 200)
    assert value(a, "loomserve_requests_total", endpoint="/v1/completions", status="200") == 1
    assert value(b, "loomserve_requests_total", endpoint="/v1/completions", status="200") is None
    assert REGISTRY.get_sample_value("loomserve_requests_total",
                                     {"endpoint": "/v1/completions", "status": "200"}) is None


def test_requests_are_counted_by_endpoint_and_status() -> None:
    g = GatewayMetrics()
    for status in (200, 200, 400, 429):
        g.observe_request("/v1/completions", status)
    g.observe_request("/v1/chat/completions", 200)
    assert value(g, "loomserve_requests_total", endpoint="/v1/completions", status="200") == 2
    assert value(g, "loomserve_requests_total", endpoint="/v1/completions", status="400") == 1
    assert value(g, "loomserve_requests_total", endpoint="/v1/completions", status="429") == 1
    assert value(g, "loomserve_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    # Requests without latencies (rejected before generation) leave the histograms alone.
    assert value(g, "loomserve_e2e_latency_seconds_count") == 0
    assert value(g, "loomserve_ttft_seconds_count") == 0


def test_per_tenant_tokens_and_cost() -> None:
    g = GatewayMetrics(price_per_1m_input_usd=0.50, price_per_1m_output_usd=1.50)
    g.observe_tokens("a", prompt_tokens=1_000_000, completion_tokens=2_000_000)
    g.observe_tokens("a", prompt_tokens=200_000, completion_tokens=0)
    g.observe_tokens("b", prompt_tokens=10, completion_tokens=30)
    assert value(g, "loomserve_prompt_tokens_total", tenant="a") == 1_200_000
    assert value(g, "loomserve_completion_tokens_total", tenant="a") == 2_000_000
    assert value(g, "loomserve_cost_usd_total", tenant="a") == pytest.approx(0.5 + 3.0 + 0.1)
    assert value(g, "loomserve_prompt_tokens_total", tenant="b") == 10
    assert value(g, "loomserve_cost_usd_total", tenant="b") == pytest.approx((10 * 0.5 + 30 * 1.5) / 1e6)
    assert g.cost_usd_of(2_000_000, 1_000_000) == pytest.approx(2.5)


def test_cost_is_zero_without_prices_and_prices_must_not_be_negative() -> None:
    g = GatewayMetrics()
    g.observe_tokens("a", 1000, 1000)
    assert value(g, "loomserve_cost_usd_total", tenant="a") == 0
    with pytest.raises(ValueError):
        GatewayMetrics(price_per_1m_input_usd=-1)


def test_status_fed_counters_show_the_scheduler_absolute_values() -> None:
    g = GatewayMetrics()
    # Before any status every scheduler metric is present, at zero.
    assert value(g, "loomserve_preemptions_total") == 0
    assert value(g, "loomserve_kv_blocks_total") == 0
    for preemptions, queries, hits in [(1, 100, 10), (4, 300, 90), (4, 300, 90), (9, 350, 100)]:
        g.update_from_status(SchedulerSnapshot(prefix_cache_queries=queries, prefix_cache_hits=hits,
                                               num_preemptions=preemptions))
        # The exposed value is the scheduler's own count, not a sum of the updates.
        assert value(g, "loomserve_preemptions_total") == preemptions
        assert value(g, "loomserve_prefix_cache_queries_total") == queries
        assert value(g, "loomserve_prefix_cache_hits_total") == hits


def test_status_fed_counters_survive_a_scheduler_restart() -> None:
    g = GatewayMetrics()
    g.update_from_status(SchedulerSnapshot(num_preemptions=7, prefix_cache_queries=500))
    # The scheduler restarted: its counts begin again at 0; the exposed counters must not go down.
    g.update_from_status(SchedulerSnapshot(num_preemptions=2, prefix_cache_queries=40))
    assert value(g, "loomserve_preemptions_total") == 9
    assert value(g, "loomserve_engine_steps_total") == 0
    assert value(g, "loomserve_prefix_cache_queries_total") == 540
    g.update_from_status(SchedulerSnapshot(num_preemptions=5, prefix_cache_queries=100))
    assert value(g, "loomserve_preemptions_total") == 12
    assert value(g, "loomserve_prefix_cache_queries_total") == 600


def test_status_fed_gauges_follow_the_latest_status() -> None:
    g = GatewayMetrics()
    g.update_from_status(SchedulerSnapshot(num_waiting=8, num_running=4, num_free_blocks=10, num_total_blocks=64))
    g.update_from_status(SchedulerSnapshot(num_waiting=1, num_running=2, num_free_blocks=60, num_total_blocks=64))
    assert value(g, "loomserve_queue_depth") == 1
    assert value(g, "loomserve_running_sequences") == 2
    assert value(g, "loomserve_kv_blocks_used") == 4
    assert value(g, "loomserve_kv_blocks_total") == 64


def test_the_scheduler_status_message_feeds_the_metrics() -> None:
    g = GatewayMetrics()
    g.update_from_status(m.SchedulerStatus(nonce=1, workers_ready=True, num_waiting=2, num_running=3,
                                           num_free_blocks=5, num_total_blocks=9, prefix_cache_queries=7,
                                           prefix_cache_hits=6, num_preemptions=1, num_steps=11,
                                           num_scheduled_tokens=120, num_forks=2, num_block_copies=3))
    assert value(g, "loomserve_queue_depth") == 2
    assert value(g, "loomserve_kv_blocks_used") == 4
    assert value(g, "loomserve_prefix_cache_queries_total") == 7
    assert value(g, "loomserve_prefix_cache_hits_total") == 6
    assert value(g, "loomserve_preemptions_total") == 1
    assert value(g, "loomserve_engine_steps_total") == 11
    assert value(g, "loomserve_scheduled_tokens_total") == 120
    assert value(g, "loomserve_parallel_sampling_forks_total") == 2
    assert value(g, "loomserve_kv_block_copies_total") == 3


def test_histogram_buckets_span_milliseconds_to_minutes() -> None:
    for buckets in (TTFT_BUCKETS, TPOT_BUCKETS, E2E_BUCKETS):
        assert list(buckets) == sorted(buckets)
        assert buckets[0] <= 0.005
    assert TTFT_BUCKETS[-1] >= 120 and E2E_BUCKETS[-1] >= 600
    g = GatewayMetrics()
    g.observe_request("/v1/completions", 200, e2e_s=0.003, ttft_s=0.0009)
    g.observe_request("/v1/completions", 200, e2e_s=900.0, ttft_s=200.0)
    assert value(g, "loomserve_ttft_seconds_bucket", le="0.001") == 1
    assert value(g, "loomserve_ttft_seconds_bucket", le="320.0") == 2
    assert value(g, "loomserve_e2e_latency_seconds_bucket", le="0.005") == 1
    assert value(g, "loomserve_e2e_latency_seconds_bucket", le="600.0") == 1
    assert value(g, "loomserve_e2e_latency_seconds_bucket", le="1200.0") == 2


def test_time_per_output_token() -> None:
    assert time_per_output_token(0.5, 2.5, 5) == pytest.approx(0.5)
    assert time_per_output_token(0.5, 0.5, 1) is None
    assert time_per_output_token(0.5, 0.7, 0) is None
    # Clocks read in another order never give a negative time.
    assert time_per_output_token(1.0, 0.9, 3) == 0.0


# One gateway process: n requests answered, one refused by a rate limit, and a scheduler
# status of its own (queue depth n); then its /metrics exposition on stdout.
_GATEWAY_PROCESS = """
import sys
from loomserve.gateway.metrics import GatewayMetrics, SchedulerSnapshot
n = int(sys.argv[1])
g = GatewayMetrics()
for _ in range(n):
    g.observe_request("/v1/completions", 200, e2e_s=0.5, ttft_s=0.1, tpot_s=0.01)
g.observe_request("/v1/completions", 429)
g.observe_tokens("acme", 10 * n, n)
g.observe_cache_lookup(True)
g.observe_cache_lookup(False)
g.observe_cache_error("get")
g.observe_rate_limit_rejection("acme", "requests")
g.update_from_status(SchedulerSnapshot(num_waiting=n, num_total_blocks=100, num_free_blocks=90, num_steps=7))
sys.stdout.buffer.write(g.metrics_response()[0])
"""


def _gateway_process(metrics_dir: Path, requests: int) -> dict[SampleKey, float]:
    """Run one gateway's metrics in a fresh interpreter (the variable must be set before
    prometheus_client is imported) and parse what its /metrics shows."""
    out = subprocess.run([sys.executable, "-c", _GATEWAY_PROCESS, str(requests)], capture_output=True, text=True,
                         check=True, env={**os.environ, MULTIPROC_DIR_ENV: str(metrics_dir)}).stdout
    return exposed_samples(out)


def test_several_gateway_processes_expose_their_sum_and_the_scheduler_once(tmp_path: Path) -> None:
    _gateway_process(tmp_path, requests=3)
    s = _gateway_process(tmp_path, requests=5)  # sees the first process's file as well as its own
    for metric in ALL_METRICS:
        assert any(name.startswith(metric) for name, _ in s), metric
    completions = (("endpoint", "/v1/completions"),)
    assert s[("loomserve_requests_total", (*completions, ("status", "200")))] == 8
    assert s[("loomserve_requests_total", (*completions, ("status", "429")))] == 2
    assert s[("loomserve_e2e_latency_seconds_count", ())] == 8
    assert s[("loomserve_e2e_latency_seconds_sum", ())] == 4.0
    assert s[("loomserve_e2e_latency_seconds_bucket", (("le", "0.5"),))] == 8
    assert s[("loomserve_e2e_latency_seconds_bucket", (("le", "0.25"),))] == 0
    assert s[("loomserve_ttft_seconds_count", ())] == 8
    assert s[("loomserve_prompt_tokens_total", (("tenant", "acme"),))] == 80
    assert s[("loomserve_completion_tokens_total", (("tenant", "acme"),))] == 8
    assert s[("loomserve_response_cache_hits_total", ())] == 2
    assert s[("loomserve_response_cache_errors_total", (("op", "get"),))] == 2
    assert s[("loomserve_rate_limit_rejections_total", (("limit", "requests"), ("tenant", "acme")))] == 2
    # The scheduler's numbers are the answering process's latest status, not a sum.
    assert s[("loomserve_queue_depth", ())] == 5
    assert s[("loomserve_kv_blocks_used", ())] == 10
    assert s[("loomserve_kv_blocks_total", ())] == 100
    assert s[("loomserve_engine_steps_total", ())] == 7
    # one counter file and one histogram file per process (no gauge files to clean up at exit)
    assert sorted(p.name.split("_")[0] for p in tmp_path.iterdir()) == ["counter"] * 2 + ["histogram"] * 2


def test_multiprocess_directory_set_too_late_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus_client picks its value store at import: set afterwards, the variable would
    leave every value in this process and /metrics would show the others' only."""
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="set after prometheus_client was imported"):
        GatewayMetrics()
