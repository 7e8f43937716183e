"""OpenTelemetry tracing for every loomserve process, one trace per request.

Each process calls ``setup_tracing`` once at start: with an OTLP/HTTP endpoint,
finished spans are batched and exported from a background thread; without one,
the tracer is a no-op and costs next to nothing. ``shutdown_tracing`` flushes
what is left at exit.

A request crosses processes as a W3C ``traceparent`` string inside the messages
(``AddRequest.traceparent``, ``NewRequestData.traceparent``): ``inject_traceparent``
writes it from a span, ``context_from_traceparent`` turns it back into a parent
context on the other side.

The scheduler learns durations (queue wait, prefill) only after the fact, so
``record_span`` makes a span for an interval that already ended.

Prompt text is user data: it enters span attributes only through
``prompt_attributes``, which returns nothing unless ``LOOMSERVE_TRACE_PROMPTS=1``.

The tracer provider is this module's own rather than OpenTelemetry's global one,
which can be set only once per process: tests set up a "gateway", a "scheduler"
and a "worker" in turn within one process, each with its service name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

log = logging.getLogger(__name__)

TRACE_PROMPTS_ENV = "LOOMSERVE_TRACE_PROMPTS"
PROMPT_ATTRIBUTE = "loomserve.prompt"
# Long prompts would make spans heavy for the collector; the head is what a reader looks at.
PROMPT_ATTRIBUTE_MAX_CHARS = 4096

_TRACES_PATH = "/v1/traces"
_TRACEPARENT = "traceparent"
_propagator = TraceContextTextMapPropagator()


@dataclass
class _State:
    provider: trace.TracerProvider = field(default_factory=trace.NoOpTracerProvider)
    sdk_provider: TracerProvider | None = None
    trace_prompts: bool = False
    # One tracer per name: the SDK builds a new one on every get_tracer call, and the
    # scheduler records several spans per request.
    tracers: dict[str, Tracer] = field(default_factory=dict)


_state = _State()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def traces_url(endpoint: str) -> str:
    """``endpoint`` as the URL spans are posted to: a bare collector address such as
    ``http://otel:4318`` gets the OTLP traces path; a URL with a path is used as given."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return urlunsplit((parts.scheme, parts.netloc, _TRACES_PATH, parts.query, parts.fragment))
    return endpoint


def setup_tracing(service_name: str, endpoint: str | None, trace_prompts: bool | None = None) -> None:
    """Configures this process's tracer; call once at start (again replaces the setup).

    ``endpoint`` is an OTLP/HTTP collector (``http://host:4318`` or the full
    ``.../v1/traces`` URL); None turns tracing off. ``trace_prompts`` None reads
    ``LOOMSERVE_TRACE_PROMPTS``. Sampling follows the standard ``OTEL_TRACES_SAMPLER``
    variables; by default a span is sampled when its parent is (and every root is).
    """
    shutdown_tracing()
    _state.trace_prompts = _env_flag(TRACE_PROMPTS_ENV) if trace_prompts is None else trace_prompts
    if endpoint is None:
        log.info("tracing off for %s (no OTLP endpoint configured)", service_name)
        return
    url = traces_url(endpoint)
    # The SDK also flushes at interpreter exit (shutdown_on_exit), so a process that ends
    # without calling shutdown_tracing still exports its last spans.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    _state.provider = provider
    _state.sdk_provider = provider
    log.info("tracing %s to %s%s", service_name, url,
             " (prompt text included in spans)" if _state.trace_prompts else "")


def tracing_enabled() -> bool:
    return _state.sdk_provider is not None


def get_tracer(name: str) -> Tracer:
    """A tracer of the provider set up by ``setup_tracing`` (a no-op one before that)."""
    tracer = _state.tracers.get(name)
    if tracer is None:
        tracer = _state.tracers[name] = _state.provider.get_tracer(name)
    return tracer


def force_flush(timeout_s: float = 5.0) -> bool:
    """Exports every finished span now; False if that did not finish within ``timeout_s``."""
    if _state.sdk_provider is None:
        return True
    return _state.sdk_provider.force_flush(int(timeout_s * 1000))


def shutdown_tracing() -> None:
    """Flushes and stops the exporter; tracing is a no-op (and prompts are left out)
    afterwards until set up again."""
    provider = _state.sdk_provider
    _state.provider = trace.NoOpTracerProvider()
    _state.sdk_provider = None
    _state.tracers.clear()
    _state.trace_prompts = False
    if provider is not None:
        provider.shutdown()


def inject_traceparent(span: Span) -> str | None:
    """The W3C traceparent of ``span``, for a message to another process; None when the
    span has no valid context (tracing off and no parent to pass along)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span, Context()))
    return carrier.get(_TRACEPARENT)


def context_from_traceparent(traceparent: str | None) -> Context:
    """A context whose parent is the remote span named by ``traceparent``; an empty
    context (the next span starts a new trace) when it is None or malformed."""
    if not traceparent:
        return Context()
    return _propagator.extract({_TRACEPARENT: traceparent}, context=Context())


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Mapping[str, str | bool | int | float] | None = None


def record_span(
    name: str,
    start_ns: int,
    end_ns: int,
    parent: Context | None = None,
    attributes: Attributes = None,
    events: Sequence[SpanEvent] = (),
    error: str | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    tracer_name: str = "loomserve",
) -> Span:
    """A span for an interval that has already ended (``time.time_ns()`` values), ended on return.

    ``parent`` None starts a new trace. ``error`` marks the span failed with that description.
    The returned span's context can still be passed on with ``inject_traceparent``.
    """
    if end_ns < start_ns:
        raise ValueError(f"span {name!r} ends ({end_ns}) before it starts ({start_ns})")
    span = get_tracer(tracer_name).start_span(name, context=parent if parent is not None else Context(),
                                              kind=kind, attributes=attributes, start_time=start_ns)
    for event in events:
        span.add_event(event.name, attributes=event.attributes, timestamp=event.time_ns)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)
    return span


def prompt_attributes(text: str) -> dict[str, str | bool]:
    """Span attributes holding the prompt, or none unless prompt tracing is on."""
    if not _state.trace_prompts:
        return {}
    if len(text) <= PROMPT_ATTRIBUTE_MAX_CHARS:
        return {PROMPT_ATTRIBUTE: text}
    return {PROMPT_ATTRIBUTE: text[:PROMPT_ATTRIBUTE_MAX_CHARS], PROMPT_ATTRIBUTE + ".truncated": True}
