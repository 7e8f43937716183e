"""loomserve's processes as the benchmarks start them (serve itself: the ablation's slow smoke run)."""

from __future__ import annotations

import httpx

from bench.harness.processes import ProcessGroup
from bench.harness.readiness import free_port
from bench.harness.stacks import BackendOptions, serve_argv, start_backend, start_gateway


def test_serve_listens_on_the_loopback_port() -> None:
    assert serve_argv(8123, ["--batching", "static"]) == [
        "loomserve.cli", "serve", "--host", "127.0.0.1", "--port", "8123", "--batching", "static"]


def test_gateway_over_scheduler_and_echo_worker() -> None:
    with ProcessGroup() as group:
        scheduler_address = start_backend(group, BackendOptions(max_num_seqs=4, num_kv_blocks=64, max_model_len=256))
        base_url = start_gateway(group, free_port(), scheduler_address, None)
        assert list(group.procs) == ["scheduler", "echo-worker", "gateway"]
        assert httpx.get(base_url + "/health", timeout=5).status_code == 200
