"""loomserve's processes as the benchmarks start them: ``loomserve serve``, or the gateway and
the scheduler with the echo worker (``bench/echo_worker.py``) in place of the model worker.

| function          | processes in the group                | returns                          |
|-------------------|---------------------------------------|----------------------------------|
| ``start_backend`` | scheduler, echo-worker                | the scheduler's gateway address  |
| ``start_gateway`` | gateway (beside a running backend)    | its base URL, once healthy       |
| ``start_serve``   | serve (gateway, scheduler and worker) | its base URL, once healthy       |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.harness.processes import ProcessGroup
from bench.harness.readiness import local_url, wait_healthy


@dataclass(frozen=True)
class BackendOptions:
    """Scheduler and echo worker settings; KV cache and model length sized by the caller."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    num_kv_blocks: int = 65536
    max_model_len: int = 8192
    enable_prefix_caching: bool = True


def start_backend(group: ProcessGroup, options: BackendOptions) -> str:
    """Start a scheduler (under cProfile if the group profiles) and an echo worker on ipc sockets."""
    gateway_address = group.address("gateway")
    worker_address = group.address("worker")
    group.spawn("scheduler", [
        "loomserve.cli", "scheduler",
        "--gateway-address", gateway_address,
        "--worker-address", worker_address,
        "--max-num-seqs", str(options.max_num_seqs),
        "--max-num-batched-tokens", str(options.max_num_batched_tokens),
        "--enable-prefix-caching", str(options.enable_prefix_caching).lower(),
    ], profile=True)
    group.spawn("echo-worker", [
        "bench.echo_worker",
        "--scheduler-address", worker_address,
        "--num-kv-blocks", str(options.num_kv_blocks),
        "--max-model-len", str(options.max_model_len),
    ])
    return gateway_address


def start_gateway(group: ProcessGroup, port: int, scheduler_address: str, model: str | None,
                  timeout_s: float = 120.0) -> str:
    """Start ``loomserve gateway`` (under cProfile if the group profiles) for the scheduler at
    ``scheduler_address``, serving ``model``'s tokenizer (None: the default model's)."""
    group.spawn("gateway", [
        "loomserve.cli", "gateway", "--host", "127.0.0.1", "--port", str(port),
        "--scheduler-address", scheduler_address, *(["--model", model] if model else []),
    ], profile=True)
    base_url = local_url(port)
    wait_healthy(group, "gateway", base_url, timeout_s, interval_s=0.2)
    return base_url


def serve_argv(port: int, options: Sequence[str]) -> list[str]:
    """The ``python -m`` arguments of ``loomserve serve`` on 127.0.0.1:``port`` with ``options``."""
    return ["loomserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *options]


def start_serve(group: ProcessGroup, port: int, options: Sequence[str], timeout_s: float) -> str:
    """Start ``loomserve serve`` as process ``serve`` and wait up to ``timeout_s`` for its health."""
    group.spawn("serve", serve_argv(port, options))
    base_url = local_url(port)
    wait_healthy(group, "serve", base_url, timeout_s)
    return base_url
