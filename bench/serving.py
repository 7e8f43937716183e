"""Serving benchmark: replay a workload against an OpenAI-compatible server and time it.

Every request streams (SSE) with ``stream_options.include_usage``; output token counts come
from the server's usage chunk, never from counting chunks, since one chunk may carry several
tokens. Per request, measured on the client with a monotonic clock from the moment the
request is sent (after any wait for a concurrency slot):

| metric | definition                                                                   |
|--------|------------------------------------------------------------------------------|
| TTFT   | send -> first chunk whose text (or chat delta content) is non-empty          |
| ITL    | gaps between consecutive content chunks (pooled over all requests)           |
| E2EL   | send -> ``data: [DONE]``                                                     |
| TPOT   | (E2EL - TTFT) / (output_tokens - 1), for requests with more than one token   |

Run-level: duration is the wall time from the first send to the last response;
throughputs divide completed requests, output tokens and input + output tokens by it.
A request fails on a non-200 status, an error event, a stream without content, usage or
``[DONE]``, a transport error or its hard timeout; it is counted and never stops the run.
Client CPU (user + system, every thread of every client process, first send to last
response) per output token tells whether the load generator was near saturation: at about
50 µs a token, one client process tops out near 20k streamed tokens/s.

Client processes (``--client-processes K``), so that the load generator is not the bottleneck:

| what              | how it is shared among the K processes                                   |
|-------------------|--------------------------------------------------------------------------|
| requests          | dealt round-robin, request i to process i mod K, so every share has the  |
|                   | workload's mix; outcomes merged back in workload order                   |
| arrival times     | drawn once for the whole run; each process sends its requests at their   |
|                   | offsets from one start instant, given once every process is ready        |
| concurrency limit | split as evenly as it goes (10 over 4: 3, 3, 2, 2), so the total stays;  |
|                   | a slot freed in one process serves only that process's requests          |
| metrics           | computed once, over all outcomes, as for one process                     |

Per-request times are differences of one process's clock readings. The run's first send and
last response compare readings of different processes: ``time.perf_counter`` is
CLOCK_MONOTONIC on Linux, one clock for the whole host, which is what makes them comparable.
K = 1 runs in this process; K > 1 spawns K processes (never more than requests or slots).

    python -m bench.serving --workload rag --num-requests 200 --concurrency 32 \\
        --output-json results/rag.json --label baseline
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import sys
import time
import traceback
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import httpx
import numpy as np

from bench.harness import plots
from bench.harness.cli import add_output_json, new_parser, setup_logging
from bench.harness.metadata import command_line, run_metadata
from bench.harness.metrics import BenchMetrics, LatencySummary, RequestOutcome, compute_metrics
from bench.harness.results import write_chart, write_json
from bench.workloads import (
    DEFAULT_VOCAB_SIZE,
    SYNTHETIC_WORKLOADS,
    BenchRequest,
    TextTokenizer,
    Workload,
    build_workload,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RESULT_SCHEMA = "loomserve.bench.serving/1"
Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[str, str] = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
}
DEFAULT_NUM_REQUESTS = 200
_ERROR_BODY_CHARS = 300
# Spawning a client process imports this module (and the parent's main module) afresh.
_CLIENT_START_TIMEOUT_S = 120.0
_READY = "ready"  # what a client process sends once it can start sending requests


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload
    base_url: str = DEFAULT_BASE_URL
    endpoint: Endpoint = "completions"
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    concurrency: int | None = None  # most requests in flight; None: no limit
    request_rate: float = math.inf  # Poisson arrivals per second; inf: all queued at once
    temperature: float = 0.0
    seed: int = 0  # seeds the arrival times (the workload carries its own seed)
    ignore_eos: bool = True  # force every output to its planned length
    request_timeout_s: float = 600.0
    label: str | None = None
    command: str | None = None  # the command line to record with the results
    max_error_messages: int = 5
    client_processes: int = 1  # processes sharing the requests (module docstring)

    def __post_init__(self) -> None:
        if not self.workload.requests:
            raise ValueError(f"workload {self.workload.name!r} has no requests")
        if self.client_processes < 1:
            raise ValueError(f"client_processes must be at least 1, got {self.client_processes}")
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive, got {self.request_rate}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.endpoint == "chat" and any(not isinstance(r.prompt, str) for r in self.workload.requests):
            raise ValueError(
                "the chat endpoint needs text prompts; pass a tokenizer to build the "
                "workload as text, or use the completions endpoint"
            )

    @property
    def num_client_processes(self) -> int:
        """The processes a run uses: client_processes, but none without a request or a slot."""
        most = min(self.client_processes, len(self.workload.requests))
        return most if self.concurrency is None else min(most, self.concurrency)


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    model: str
    metadata: dict[str, Any]
    metrics: BenchMetrics
    outcomes: list[RequestOutcome]
    client_cpu_s: float  # user + system time of every client process over the run
    window: tuple[float, float]  # time.perf_counter() of the run's first send and last response

    @property
    def client_cpu_us_per_output_token(self) -> float | None:
        tokens = self.metrics.total_output_tokens
        return self.client_cpu_s * 1e6 / tokens if tokens else None

    def to_json(self) -> dict[str, Any]:
        """The result file's content (bench/README.md describes each field)."""
        config = self.config
        metrics = self.metrics
        return {
            "schema": RESULT_SCHEMA,
            "label": config.label,
            "metadata": self.metadata,
            "config": {
                "base_url": config.base_url,
                "endpoint": config.endpoint,
                "model": self.model,
                "concurrency": config.concurrency,
                "request_rate": None if math.isinf(config.request_rate) else config.request_rate,
                "temperature": config.temperature,
                "seed": config.seed,
                "ignore_eos": config.ignore_eos,
                "request_timeout_s": config.request_timeout_s,
                "client_processes": config.num_client_processes,
            },
            "workload": config.workload.describe(),
            "metrics": {
                "completed": metrics.completed,
                "failed": metrics.failed,
                "duration_s": metrics.duration_s,
                "total_input_tokens": metrics.total_input_tokens,
                "total_output_tokens": metrics.total_output_tokens,
                "request_throughput": metrics.request_throughput,
                "output_throughput": metrics.output_throughput,
                "total_token_throughput": metrics.total_token_throughput,
                "ttft_ms": _summary_json(metrics.ttft_ms),
                "tpot_ms": _summary_json(metrics.tpot_ms),
                "itl_ms": _summary_json(metrics.itl_ms),
                "e2el_ms": _summary_json(metrics.e2el_ms),
                "output_len_mismatches": metrics.output_len_mismatches,
                "errors": metrics.errors,
                "client_cpu_s": self.client_cpu_s,
                "client_cpu_us_per_output_token": self.client_cpu_us_per_output_token,
            },
            "requests": [
                {
                    "prompt_len": o.prompt_len,
                    "planned_output_len": o.planned_output_len,
                    "output_tokens": o.output_tokens,
                    "ttft_ms": _ms(o.ttft_s),
                    "tpot_ms": _ms(o.tpot_s),
                    "e2el_ms": _ms(o.e2el_s),
                    "error": o.error,
                }
                for o in self.outcomes
            ],
        }

    def format_table(self) -> str:
        config, m = self.config, self.metrics
        rate = "all at once" if math.isinf(config.request_rate) else f"{config.request_rate:g}/s"
        cpu_us = self.client_cpu_us_per_output_token
        rows: list[tuple[str, str]] = [
            ("label", config.label or "-"),
            ("model", f"{self.model} ({config.endpoint}, {config.base_url})"),
            ("workload", f"{config.workload.name}, {len(config.workload.requests)} requests"),
            ("arrivals", f"{rate}, concurrency {config.concurrency or 'unlimited'}"),
            ("completed / failed", f"{m.completed} / {m.failed}"),
            ("duration (s)", f"{m.duration_s:.2f}"),
            ("input / output tokens", f"{m.total_input_tokens} / {m.total_output_tokens}"),
            ("request throughput (req/s)", f"{m.request_throughput:.2f}"),
            ("output token throughput (tok/s)", f"{m.output_throughput:.1f}"),
            ("total token throughput (tok/s)", f"{m.total_token_throughput:.1f}"),
            ("client processes", str(config.num_client_processes)),
            ("client CPU per output token (µs)", "n/a" if cpu_us is None else f"{cpu_us:.1f}"),
        ]
        if m.output_len_mismatches:
            rows.append(("outputs not of planned length", str(m.output_len_mismatches)))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines.append("")
        lines.append(f"{'(ms)':<6}{'mean':>12}{'median':>12}{'p95':>12}{'p99':>12}")
        for name, summary in (
            ("TTFT", m.ttft_ms),
            ("TPOT", m.tpot_ms),
            ("ITL", m.itl_ms),
            ("E2EL", m.e2el_ms),
        ):
            if summary is None:
                lines.append(f"{name:<6}{'n/a':>12}")
            else:
                values = (summary.mean, summary.median, summary.p95, summary.p99)
                lines.append(f"{name:<6}" + "".join(f"{v:>12.2f}" for v in values))
        if m.errors:
            lines.append("")
            lines.append(f"first {len(m.errors)} of {m.failed} errors:")
            lines.extend(f"  {error}" for error in m.errors)
        return "\n".join(lines)


def poisson_arrivals(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send offsets in seconds: exponential gaps at request_rate, the first at 0."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    gaps[0] = 0.0
    return [float(t) for t in np.cumsum(gaps)]


async def fetch_first_model(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/v1/models", timeout=30.0)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(
            f"could not read the model name from {client.base_url}v1/models ({exc!r}); "
            "is the server up? Otherwise name the model explicitly"
        ) from exc


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Send the workload's requests as configured and measure them."""
    requests = config.workload.requests
    arrivals = poisson_arrivals(len(requests), config.request_rate, config.seed)
    model = config.model or await _first_model(config)
    if config.num_client_processes == 1:
        async with _http_client(config) as client:
            runs = [await _send_requests(client, config, model, arrivals, time.perf_counter(),
                                         _Progress(len(requests)))]
        parent_cpu_s = 0.0
    else:
        shards = shard_requests(config, model, arrivals)
        runs, parent_cpu_s = await asyncio.to_thread(run_client_processes, shards)
    outcomes = merge_outcomes([run.outcomes for run in runs])
    window = (min(run.first_send for run in runs), max(run.last_response for run in runs))
    duration = window[1] - window[0]
    metrics = compute_metrics(
        outcomes,
        duration,
        ignore_eos=config.ignore_eos,
        max_error_messages=config.max_error_messages,
    )
    if metrics.output_len_mismatches:
        logger.warning(
            "%d completed requests did not produce their planned output length although ignore_eos was set",
            metrics.output_len_mismatches,
        )
    client_cpu_s = parent_cpu_s + sum(run.cpu_s for run in runs)
    return BenchResult(config, model, run_metadata(config.command), metrics, outcomes, client_cpu_s, window)


@dataclass(frozen=True)
class ClientShard:
    """One client process's part of a run."""

    config: BenchConfig  # every K-th request of the workload and its part of the concurrency limit
    model: str
    arrivals: tuple[float, ...]  # its requests' send offsets on the run's one schedule


@dataclass
class ShardRun:
    """What one client process measured.

    first_send and last_response are ``time.perf_counter()`` readings, comparable across the
    processes of a host (CLOCK_MONOTONIC on Linux): the run lasts from the earliest first send
    to the latest last response of any process.
    """

    outcomes: list[RequestOutcome]  # in the order of the shard's requests
    first_send: float
    last_response: float
    cpu_s: float  # user + system time of the process, all threads, over its sends


@dataclass(frozen=True)
class _ClientFailure:
    """A client process's exception, sent to the parent in place of its ShardRun."""

    traceback: str


def split_concurrency(concurrency: int | None, parts: int) -> list[int | None]:
    """Each part's concurrency limit: the total split as evenly as it goes (None: no limit)."""
    if concurrency is None:
        return [None] * parts
    if concurrency < parts:
        raise ValueError(f"a concurrency of {concurrency} cannot be split over {parts} client processes")
    share, extra = divmod(concurrency, parts)
    return [share + (i < extra) for i in range(parts)]


def shard_requests(config: BenchConfig, model: str, arrivals: Sequence[float]) -> list[ClientShard]:
    """Deal the requests and their arrival offsets round-robin over the run's client processes."""
    parts = config.num_client_processes
    requests = config.workload.requests
    shards = []
    for i, concurrency in enumerate(split_concurrency(config.concurrency, parts)):
        workload = replace(config.workload, requests=requests[i::parts])
        shard_config = replace(config, workload=workload, concurrency=concurrency, client_processes=1)
        shards.append(ClientShard(shard_config, model, tuple(arrivals[i::parts])))
    return shards


def merge_outcomes(per_shard: Sequence[Sequence[RequestOutcome]]) -> list[RequestOutcome]:
    """Undo the round-robin deal: request i is shard (i mod K)'s (i div K)-th."""
    parts = len(per_shard)
    total = sum(len(outcomes) for outcomes in per_shard)
    return [per_shard[i % parts][i // parts] for i in range(total)]


def run_client_processes(shards: Sequence[ClientShard]) -> tuple[list[ShardRun], float]:
    """Run each shard in a process of its own; return what each measured, in shard order, and
    this process's CPU time while they ran.

    The processes are spawned (a fork would copy whatever threads and sockets the caller holds),
    so they import the caller's main module again: a script needs the ``__main__`` guard. The
    run's schedule starts once every process has imported its modules and built its client.
    """
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    conns: list[Connection] = []
    try:
        for i, shard in enumerate(shards):
            conn, child_conn = context.Pipe()
            child = context.Process(target=_client_process, args=(child_conn, shard),
                                    name=f"bench-client-{i}", daemon=True)
            child.start()
            child_conn.close()  # the child holds the only other end: its exit reads here as EOF
            processes.append(child)
            conns.append(conn)
        deadline = time.monotonic() + _CLIENT_START_TIMEOUT_S
        for i, conn in enumerate(conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"client process {i} was not ready after {_CLIENT_START_TIMEOUT_S:g} s")
            if (message := _receive(conn, i)) != _READY:
                raise RuntimeError(f"client process {i} sent {message!r} before its start")
        cpu_before = time.process_time()
        start_at = time.perf_counter()
        for conn in conns:
            conn.send(start_at)
        runs: dict[int, ShardRun] = {}
        pending = {conn: i for i, conn in enumerate(conns)}
        while pending:
            for ready in multiprocessing.connection.wait(list(pending)):
                assert isinstance(ready, Connection)
                i = pending.pop(ready)
                runs[i] = _receive(ready, i)
                logger.info("client process %d finished its %d requests", i, len(runs[i].outcomes))
        return [runs[i] for i in range(len(conns))], time.process_time() - cpu_before
    finally:
        for conn in conns:
            conn.close()
        for process in processes:
            process.join(5.0)
            if process.is_alive():
                process.terminate()
                process.join()


def _receive(conn: Connection, index: int) -> Any:
    """The next message of client process ``index``; raises if it failed or exited."""
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError(f"client process {index} exited without a result") from None
    if isinstance(message, _ClientFailure):
        raise RuntimeError(f"client process {index} failed:\n{message.traceback}")
    return message


def _client_process(conn: Connection, shard: ClientShard) -> None:
    """A client process: report ready, then send the shard's requests from the start the parent sends."""
    try:
        conn.send(asyncio.run(_run_shard(conn, shard)))
    except Exception:
        conn.send(_ClientFailure(traceback.format_exc()))
    finally:
        conn.close()


async def _run_shard(conn: Connection, shard: ClientShard) -> ShardRun:
    async with _http_client(shard.config) as client:
        conn.send(_READY)
        start_at = await asyncio.to_thread(conn.recv)
        return await _send_requests(client, shard.config, shard.model, shard.arrivals, start_at, None)


def _http_client(config: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # The pool must never be the bottleneck: a request waiting for a connection would be
    # timed as if the server were slow.
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    return httpx.AsyncClient(base_url=config.base_url, headers=headers, limits=limits, timeout=None)


async def _first_model(config: BenchConfig) -> str:
    async with _http_client(config) as client:
        return await fetch_first_model(client)


async def _send_requests(
    client: httpx.AsyncClient,
    config: BenchConfig,
    model: str,
    arrivals: Sequence[float],
    start_at: float,
    progress: _Progress | None,
) -> ShardRun:
    """Send config's requests, each at ``start_at`` + its arrival offset once a slot is free."""
    requests = config.workload.requests
    slots = asyncio.Semaphore(config.concurrency or max(1, len(requests)))

    async def send(request: BenchRequest) -> RequestOutcome:
        async with slots:
            outcome = await _timed_request(client, config, model, request)
        if progress is not None:
            progress.advance()
        return outcome

    cpu_before = time.process_time()
    first_send: float | None = None
    tasks: list[asyncio.Task[RequestOutcome]] = []
    for request, offset in zip(requests, arrivals, strict=True):
        delay = start_at + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if first_send is None:
            first_send = time.perf_counter()
        tasks.append(asyncio.create_task(send(request)))
    outcomes = list(await asyncio.gather(*tasks))
    last_response = time.perf_counter()
    assert first_send is not None, "a workload has at least one request"
    return ShardRun(outcomes, first_send, last_response, time.process_time() - cpu_before)


class _Progress:
    """Logs every tenth of the run, so long benchmarks show they are moving."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._done = 0
        self._step = max(1, total // 10)

    def advance(self) -> None:
        self._done += 1
        if self._done % self._step == 0 or self._done == self._total:
            logger.info("%d/%d requests finished", self._done, self._total)


class _StreamError(Exception):
    """The response broke the streaming protocol or reported an error."""


async def _timed_request(
    client: httpx.AsyncClient, config: BenchConfig, model: str, request: BenchRequest
) -> RequestOutcome:
    outcome = RequestOutcome(request.prompt_len, request.output_len)
    try:
        async with asyncio.timeout(config.request_timeout_s):
            await _stream(client, config, model, request, outcome)
    except TimeoutError:
        outcome.error = f"no complete response within {config.request_timeout_s:g} s"
    except _StreamError as exc:
        outcome.error = str(exc)
    except Exception as exc:
        # Transport errors, malformed JSON or usage, anything else: one broken response is a
        # failed request and must not take the rest of the run down with it.
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def _stream(
    client: httpx.AsyncClient,
    config: BenchConfig,
    model: str,
    request: BenchRequest,
    outcome: RequestOutcome,
) -> None:
    """Send one request and fill outcome with its timings; raise on any failure."""
    payload = _payload(config, model, request)
    start = time.perf_counter()
    last_content: float | None = None
    usage_seen = False
    async with client.stream("POST", ENDPOINT_PATHS[config.endpoint], json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", errors="replace")
            raise _StreamError(f"HTTP {response.status_code}: {body[:_ERROR_BODY_CHARS]}")
        async with contextlib.aclosing(_sse_data(response)) as events:
            async for data in events:
                now = time.perf_counter()
                if data == "[DONE]":
                    outcome.e2el_s = now - start
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise _StreamError(f"unexpected stream event: {data[:_ERROR_BODY_CHARS]}")
                if chunk.get("error"):
                    raise _StreamError(f"error event: {json.dumps(chunk['error'])}")
                if _has_content(chunk, config.endpoint):
                    if last_content is None:
                        outcome.ttft_s = now - start
                    else:
                        outcome.itls_s.append(now - last_content)
                    last_content = now
                if usage := chunk.get("usage"):
                    usage_seen = True
                    outcome.output_tokens = int(usage["completion_tokens"])
                    outcome.prompt_len = int(usage.get("prompt_tokens", outcome.prompt_len))
    if outcome.e2el_s is None:
        raise _StreamError("stream ended without data: [DONE]")
    if outcome.ttft_s is None:
        raise _StreamError("stream carried no content")
    if not usage_seen:
        raise _StreamError("stream carried no usage although include_usage was requested")


def _payload(config: BenchConfig, model: str, request: BenchRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        payload["ignore_eos"] = True
    if config.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    return payload


async def _sse_data(response: httpx.Response) -> AsyncGenerator[str, None]:
    """The data of each server-sent event (data lines joined by newlines)."""
    data_lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data_lines:
                yield "\n".join(data_lines)
                data_lines = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data_lines.append(value.removeprefix(" "))
    if data_lines:
        yield "\n".join(data_lines)


def _has_content(chunk: dict[str, Any], endpoint: Endpoint) -> bool:
    """Whether a chunk carries generated text (not just a role, finish reason or usage)."""
    for choice in chunk.get("choices") or ():
        if endpoint == "completions":
            if choice.get("text"):
                return True
        else:
            delta = choice.get("delta") or {}
            # Reasoning models stream their first tokens as reasoning, not content.
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                return True
    return False


def _summary_json(summary: LatencySummary | None) -> dict[str, float] | None:
    return None if summary is None else summary.to_json()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def latency_chart(title: str, runs: Mapping[str, Mapping[str, Any]]) -> plots.Chart | None:
    """The distributions of TTFT and TPOT over the completed requests of ``bench.serving``
    results (their JSON), one curve per label; None where no request completed."""
    panels = []
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        curves = tuple(plots.cdf(label, [r[key] for r in run["requests"] if r["error"] is None and r[key] is not None])
                       for label, run in runs.items())
        samples = [x for curve in curves for x in curve.x]
        if samples:
            # Queueing can spread TTFT over orders of magnitude: then a log axis shows the fast ones.
            panels.append(plots.Panel(f"{name} distribution", f"{name} (ms)", "fraction of requests",
                                      curves, style="step", logx=plots.wide(samples)))
    return plots.Chart(title, tuple(panels)) if panels else None


def describe_load(result: Mapping[str, Any]) -> str:
    """``rag, 200 requests, concurrency 32, all at once`` from a result's JSON."""
    config, workload = result["config"], result["workload"]
    rate = "all at once" if config["request_rate"] is None else f"{config['request_rate']:g} requests/s"
    return (f"{workload['name']}, {workload['num_requests']} requests, "
            f"concurrency {config['concurrency'] or 'unlimited'}, {rate}")


def figure(result: Mapping[str, Any]) -> plots.Chart | None:
    """The chart of a result file: its TTFT and TPOT distributions."""
    title = f"{result['label'] or result['config']['model']}: {describe_load(result)}"
    return latency_chart(title, {result["label"] or "requests": result})


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = new_parser("bench.serving", "Benchmark an OpenAI-compatible server (TTFT, TPOT, ITL, E2EL, throughput).")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server root URL")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default="completions")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token")
    parser.add_argument("--model", default=None, help="default: the first from GET /v1/models")
    parser.add_argument(
        "--workload",
        default="rag",
        help=f"{' | '.join(SYNTHETIC_WORKLOADS)} | PATH.jsonl (default: rag)",
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help=f"default: {DEFAULT_NUM_REQUESTS}, or the whole jsonl file",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: all)")
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrival rate, requests/s (default: inf, all queued at once)",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds the workload and arrivals")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Hugging Face tokenizer name or path: build text prompts (needed for chat)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="token-id prompts draw ids below this (default: %(default)s)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="shorten requests to fit this length")
    parser.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let outputs stop at EOS instead of forcing their planned length",
    )
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes sending the requests, dealt round-robin (default: 1, this process)",
    )
    add_output_json(parser)
    parser.add_argument("--label", default=None, help="a name for this run in the results")
    return parser.parse_args(argv)


def _load_tokenizer(name: str | None) -> TextTokenizer | None:
    if name is None:
        return None
    from transformers import AutoTokenizer  # slow to import; only text workloads need it

    tokenizer: TextTokenizer = AutoTokenizer.from_pretrained(name)
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging()
    num_requests = args.num_requests
    if num_requests is None and args.workload in SYNTHETIC_WORKLOADS:
        num_requests = DEFAULT_NUM_REQUESTS
    try:
        workload = build_workload(
            args.workload,
            num_requests,
            args.seed,
            vocab_size=args.vocab_size,
            tokenizer=_load_tokenizer(args.tokenizer),
            max_model_len=args.max_model_len,
        )
        config = BenchConfig(
            workload=workload,
            base_url=args.base_url,
            endpoint=args.endpoint,
            api_key=args.api_key,
            model=args.model,
            concurrency=args.concurrency,
            request_rate=args.request_rate,
            temperature=args.temperature,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            request_timeout_s=args.request_timeout,
            label=args.label,
            client_processes=args.client_processes,
            command=command_line("bench.serving", argv),
        )
        result = asyncio.run(run_benchmark(config))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.format_table())
    if args.output_json is not None:
        summary = result.to_json()
        write_json(args.output_json, summary)
        write_chart(args.output_json, figure(summary))
        print(f"\nresults written to {args.output_json}")
    return 0 if result.metrics.completed else 1


if __name__ == "__main__":
    sys.exit(main())
