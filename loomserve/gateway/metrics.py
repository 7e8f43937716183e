"""Prometheus metrics of one gateway, on a registry of its own.

Every metric lives on the ``CollectorRegistry`` of a ``GatewayMetrics`` rather than
the process-global one, so several gateways (tests, or one process serving two
apps) never collide over names. Names carry the ``loomserve_`` prefix.

Two kinds of source:
- the gateway's own events (requests, latencies, tokens, cache lookups, rate-limit
  rejections), recorded by the small ``observe_*`` methods as they happen;
- the scheduler's status, polled about once a second. The scheduler reports
  absolute counts (queue depth, KV blocks, prefix-cache queries, preemptions, steps,
  scheduled tokens, parallel-sampling forks and their block copies), so
  they are exposed by a collector that reads the latest status at scrape time
  instead of being replayed through ``inc()``.

Several gateway processes behind one port (``serve --gateway-workers N``): a scrape
lands on any of them, so each must answer for all. ``serve`` then gives every gateway
``PROMETHEUS_MULTIPROC_DIR``, which makes prometheus_client (at import) keep each
counter and histogram value in a per-process file there, whatever registry holds the
metric. ``/metrics`` then sums those files with the library's ``MultiProcessCollector``
and adds the scheduler collector of the answering process: every gateway polls the
same scheduler, so its numbers are shown once, never summed. The gateway has no
``Gauge`` of its own (the scheduler's gauges come from that collector), hence no
live-gauge files to drop when a process exits (``mark_process_dead``), and it uses no
``Info`` or ``Enum``, the types the multi-process mode cannot hold. Counters and
histograms carry no ``_created`` sample in that mode. One ``GatewayMetrics`` per
process in that mode: two in one process would write the same file entries.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

PREFIX = "loomserve_"
# Set by ``serve`` for its gateways when there are several; read by prometheus_client itself.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Time to first token: a cached prefix answers in milliseconds, a long prompt behind a
# full queue in minutes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
# Time per output token after the first: a few ms for a small model alone on a GPU, up to
# seconds for a large model on a CPU or a crowded batch.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
# Whole requests: from a cache hit (ms) to a 2k-token answer on a slow device (many minutes).
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
               90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 2400.0)

_TOKENS_PER_PRICE_UNIT = 1_000_000


class SchedulerStatusLike(Protocol):
    """What ``update_from_status`` reads; counts are absolute, as the scheduler keeps them."""

    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_total_blocks(self) -> int: ...
    @property
    def prefix_cache_queries(self) -> int: ...
    @property
    def prefix_cache_hits(self) -> int: ...
    @property
    def num_preemptions(self) -> int: ...
    @property
    def num_steps(self) -> int: ...
    @property
    def num_scheduled_tokens(self) -> int: ...
    @property
    def num_forks(self) -> int: ...
    @property
    def num_block_copies(self) -> int: ...


@dataclass(frozen=True)
class SchedulerSnapshot:
    """A plain ``SchedulerStatusLike``, for callers holding the numbers rather than a message."""

    num_waiting: int = 0
    num_running: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_scheduled_tokens: int = 0
    num_forks: int = 0
    num_block_copies: int = 0


# The scheduler's counts exposed as counters: (metric name, status field, help).
_SCHEDULER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("preemptions", "num_preemptions", "Sequences preempted for lack of KV blocks."),
    ("engine_steps", "num_steps", "Batches the worker group ran."),
    ("scheduled_tokens", "num_scheduled_tokens", "Tokens the worker group computed, prompts and outputs."),
    ("parallel_sampling_forks", "num_forks",
     "Requests of n > 1 split into their choices after one shared prefill."),
    ("kv_block_copies", "num_block_copies", "Partial KV blocks copied on write by those splits."),
)


class _MonotonicCount:
    """An absolute count from the scheduler, exposed so that it never goes down.

    The scheduler's counts restart at 0 when its worker group is rebuilt (or the
    scheduler restarts) while this gateway lives on; a drop is taken as such a restart
    and what was counted before it is kept as a base, as a Prometheus counter must be.
    """

    def __init__(self) -> None:
        self._base = 0
        self._last = 0

    def update(self, value: int) -> None:
        if value < self._last:
            self._base += self._last
        self._last = value

    @property
    def value(self) -> int:
        return self._base + self._last


class _SchedulerCollector(Collector):
    """Exposes the latest scheduler status at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes may run on another thread than the status poller
        self._snapshot = SchedulerSnapshot()
        self._counts = {field: _MonotonicCount() for _, field, _ in _SCHEDULER_COUNTERS}

    def update(self, status: SchedulerStatusLike) -> None:
        snapshot = SchedulerSnapshot(**{name: getattr(status, name) for name in SchedulerSnapshot.__dataclass_fields__})
        with self._lock:
            self._snapshot = snapshot
            for field, count in self._counts.items():
                count.update(getattr(snapshot, field))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            s = self._snapshot
            counts = {field: count.value for field, count in self._counts.items()}
        yield GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting in the scheduler's queue.",
                                value=s.num_waiting)
        yield GaugeMetricFamily(PREFIX + "running_sequences", "Sequences in the running batch.",
                                value=s.num_running)
        yield GaugeMetricFamily(PREFIX + "kv_blocks_used", "KV cache blocks in use.",
                                value=max(0, s.num_total_blocks - s.num_free_blocks))
        yield GaugeMetricFamily(PREFIX + "kv_blocks_total", "KV cache blocks in the worker group.",
                                value=s.num_total_blocks)
        for name, field, help_text in _SCHEDULER_COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_text, value=counts[field])


def metrics_response(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def time_per_output_token(ttft_s: float, e2e_s: float, output_tokens: int) -> float | None:
    """Mean time per output token after the first, or None with fewer than two tokens."""
    if output_tokens < 2:
        return None
    return max(0.0, e2e_s - ttft_s) / (output_tokens - 1)


class GatewayMetrics:
    """The gateway's metrics, with the calls that feed them.

    Prices are USD per million tokens and only feed the ``cost_usd_total`` estimate.
    Label values should come from bounded sets: ``endpoint`` the route template, not the
    raw path; ``tenant`` the configured tenant, not a client-supplied string.
    """

    def __init__(self, price_per_1m_input_usd: float = 0.0, price_per_1m_output_usd: float = 0.0) -> None:
        if price_per_1m_input_usd < 0 or price_per_1m_output_usd < 0:
            raise ValueError("token prices must not be negative")
        self.price_per_1m_input_usd = price_per_1m_input_usd
        self.price_per_1m_output_usd = price_per_1m_output_usd
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram(PREFIX + "ttft_seconds", "Time from request arrival to the first output token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "tpot_seconds", "Mean time per output token after the first, per request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e_latency = Histogram(PREFIX + "e2e_latency_seconds", "Time from request arrival to its last byte.",
                                     buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed, by tenant.",
                                     ["tenant"], registry=r)
        self.completion_tokens = Counter(PREFIX + "completion_tokens", "Completion tokens generated, by tenant.",
                                         ["tenant"], registry=r)
        self.cost_usd = Counter(PREFIX + "cost_usd", "Estimated cost in USD at the configured token prices.",
                                ["tenant"], registry=r)
        self.cache_hits = Counter(PREFIX + "response_cache_hits", "Response cache lookups that found an answer.",
                                  registry=r)
        self.cache_misses = Counter(PREFIX + "response_cache_misses", "Response cache lookups that found none.",
                                    registry=r)
        self.cache_errors = Counter(PREFIX + "response_cache_errors", "Response cache backend failures, by operation.",
                                    ["op"], registry=r)
        self.rate_limit_rejections = Counter(PREFIX + "rate_limit_rejections",
                                             "Requests refused by a rate limit, by tenant and limit.",
                                             ["tenant", "limit"], registry=r)
        self._scheduler = _SchedulerCollector()
        self.exposition = self._exposition_registry()

    def _exposition_registry(self) -> CollectorRegistry:
        """What ``/metrics`` shows: this process's registry, or with ``PROMETHEUS_MULTIPROC_DIR``
        the sum over every gateway process's files; the scheduler collector in both."""
        path = os.environ.get(MULTIPROC_DIR_ENV)
        if path is None:
            self.registry.register(self._scheduler)
            return self.registry
        if values.ValueClass is values.MutexValue:
            raise RuntimeError(f"{MULTIPROC_DIR_ENV} was set after prometheus_client was imported: this "
                               f"process's metrics would never reach {path}")
        exposition = CollectorRegistry()
        MultiProcessCollector(exposition, path)
        exposition.register(self._scheduler)
        return exposition

    def observe_request(self, endpoint: str, status: int, *, e2e_s: float | None = None,
                        ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """One answered request. Latencies are recorded for the ones given (a request that
        failed before its first token has no TTFT)."""
        self.requests.labels(endpoint, str(status)).inc()
        if e2e_s is not None:
            self.e2e_latency.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def observe_tokens(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Tokens of one request, and their estimated cost."""
        self.prompt_tokens.labels(tenant).inc(prompt_tokens)
        self.completion_tokens.labels(tenant).inc(completion_tokens)
        self.cost_usd.labels(tenant).inc(self.cost_usd_of(prompt_tokens, completion_tokens))

    def cost_usd_of(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_per_1m_input_usd
                + completion_tokens * self.price_per_1m_output_usd) / _TOKENS_PER_PRICE_UNIT

    def observe_cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def observe_cache_error(self, op: str) -> None:
        """Fits ``ResponseCache(on_error=...)``; ``op`` is "get" or "put"."""
        self.cache_errors.labels(op).inc()

    def observe_rate_limit_rejection(self, tenant: str, limit: str) -> None:
        self.rate_limit_rejections.labels(tenant, limit).inc()

    def update_from_status(self, status: SchedulerStatusLike) -> None:
        """The latest scheduler status; the scheduler-fed metrics show it from the next scrape on."""
        self._scheduler.update(status)

    def metrics_response(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for a ``/metrics`` route."""
        return metrics_response(self.exposition)
