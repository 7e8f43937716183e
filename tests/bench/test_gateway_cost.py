"""bench.gateway_cost's chart (its processes run in test_serving_client_processes.py)."""

from __future__ import annotations

from bench import gateway_cost


def test_chart_against_the_number_of_streams() -> None:
    def row(concurrency: int, tokens_per_s: float, ttft_p99: float | None) -> dict:
        return {"concurrency": concurrency, "tokens_per_s": tokens_per_s, "ttft_ms_p50": 5.0, "ttft_ms_p99": ttft_p99,
                "itl_ms_p50": 0.1, "itl_ms_p99": 1.0,
                "cpu_us_per_token": {"client": 50.0, "gateway": 45.0, "scheduler": None, "echo-worker": 3.0}}

    report = {"metadata": {"date": "2026-11-26T19:58:23+00:00"},
              "results": [row(1, 2400.0, 36.0), row(64, 9100.0, None), row(512, 8500.0, 8460.0)]}
    throughput, latency, cpu = gateway_cost.figure(report).panels
    assert throughput.series[0].x == (1, 64, 512) and throughput.xticks == (1, 64, 512) and throughput.logx
    assert throughput.series[0].y == (2400.0, 9100.0, 8500.0)
    ttft_p99 = next(s for s in latency.series if s.label == "TTFT p99")
    assert ttft_p99.x == (1, 512) and latency.logy  # a missing figure leaves a gap
    assert [s.label for s in cpu.series] == ["gateway", "scheduler", "echo-worker", "client"]
    assert cpu.series[1].x == ()
