"""Tracing helpers against a real OTLP/HTTP receiver: export, parentage across process
boundaries, spans for past intervals, and prompt text only when asked for."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.trace import SpanKind

from loomserve.shared import tracing
from loomserve.shared.tracing import (
    PROMPT_ATTRIBUTE,
    PROMPT_ATTRIBUTE_MAX_CHARS,
    TRACE_PROMPTS_ENV,
    SpanEvent,
    context_from_traceparent,
    get_tracer,
    inject_traceparent,
    prompt_attributes,
    record_span,
    setup_tracing,
    shutdown_tracing,
)
from tests.otlp_receiver import OTLPReceiver

TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
REPO_ROOT = Path(__file__).resolve().parents[2]
# OTLP status codes (opentelemetry.proto.trace.v1.Status.StatusCode)
STATUS_UNSET, STATUS_ERROR = 0, 2


@pytest.fixture(autouse=True)
def _reset_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(TRACE_PROMPTS_ENV, raising=False)
    yield
    shutdown_tracing()


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as rx:
        yield rx


def test_one_trace_from_gateway_through_scheduler_to_worker(receiver: OTLPReceiver) -> None:
    # Each "process" sets tracing up with its own service name; only the traceparent
    # string crosses from one to the next, as it does inside AddRequest and NewRequestData.
    setup_tracing("gateway", receiver.endpoint)
    a = get_tracer("gateway").start_span("POST /v1/chat/completions", kind=SpanKind.SERVER)
    traceparent_a = inject_traceparent(a)
    a.end()
    shutdown_tracing()
    assert traceparent_a is not None and TRACEPARENT_RE.match(traceparent_a)
    assert int(traceparent_a[-2:], 16) & 1  # sampled, so the processes after it record too

    setup_tracing("scheduler", receiver.endpoint)
    b = get_tracer("scheduler").start_span("scheduler.request", context=context_from_traceparent(traceparent_a))
    traceparent_b = inject_traceparent(b)
    b.end()
    shutdown_tracing()
    assert traceparent_b is not None and traceparent_b != traceparent_a

    setup_tracing("worker", receiver.endpoint)
    c = get_tracer("worker").start_span("worker.prefill", context=context_from_traceparent(traceparent_b))
    c.end()
    shutdown_tracing()

    spans = receiver.wait_for_spans(3)
    assert len(spans) == 3
    sa = receiver.by_name("POST /v1/chat/completions")
    sb = receiver.by_name("scheduler.request")
    sc = receiver.by_name("worker.prefill")
    assert sa.trace_id == sb.trace_id == sc.trace_id
    assert sa.trace_id == traceparent_a.split("-")[1]
    assert sa.parent_span_id is None
    assert sb.parent_span_id == sa.span_id
    assert sc.parent_span_id == sb.span_id
    assert sb.span_id == traceparent_b.split("-")[2]
    assert (sa.service_name, sb.service_name, sc.service_name) == ("gateway", "scheduler", "worker")


def test_trace_continues_in_a_real_subprocess(receiver: OTLPReceiver) -> None:
    setup_tracing("gateway", receiver.endpoint)
    root = get_tracer("gateway").start_span("gateway.request")
    traceparent = inject_traceparent(root)
    root.end()
    shutdown_tracing()
    assert traceparent is not None

    # The child process exits without calling shutdown_tracing: the SDK's exit hook must flush.
    child = textwrap.dedent("""
        import sys, time
        from loomserve.shared.tracing import context_from_traceparent, record_span, setup_tracing
        setup_tracing("worker", sys.argv[1])
        now = time.time_ns()
        record_span("worker.step", now - 1_000_000, now, parent=context_from_traceparent(sys.argv[2]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", child, receiver.endpoint, traceparent], check=True, env=env,
                   timeout=60, cwd=REPO_ROOT)

    receiver.wait_for_spans(2)
    parent, step = receiver.by_name("gateway.request"), receiver.by_name("worker.step")
    assert step.trace_id == parent.trace_id
    assert step.parent_span_id == parent.span_id
    assert step.service_name == "worker"


def test_past_interval_span_has_the_given_times_events_and_status(receiver: OTLPReceiver) -> None:
    setup_tracing("scheduler", receiver.endpoint)
    parent = get_tracer("scheduler").start_span("scheduler.request")
    parent_ctx = context_from_traceparent(inject_traceparent(parent))
    start = time.time_ns() - 5_000_000_000
    queued = record_span("scheduler.queue", start, start + 1_234_567, parent=parent_ctx,
                         attributes={"loomserve.queue.position": 3})
    prefill = record_span(
        "scheduler.prefill", start + 1_234_567, start + 9_000_000, parent=parent_ctx,
        attributes={"loomserve.prompt_tokens": 512, "loomserve.cached_tokens": 256},
        events=[SpanEvent("chunk", start + 2_000_000, {"tokens": 256}), SpanEvent("chunk", start + 5_000_000)],
    )
    failed = record_span("scheduler.decode", start + 9_000_000, start + 9_000_000, parent=parent_ctx,
                         error="the worker group is down")
    parent.end()
    assert inject_traceparent(prefill) is not None  # an ended span's context can still be passed on
    shutdown_tracing()

    receiver.wait_for_spans(4)
    root = receiver.by_name("scheduler.request")
    q, p, d = (receiver.by_name(n) for n in ("scheduler.queue", "scheduler.prefill", "scheduler.decode"))
    assert (q.start_ns, q.end_ns) == (start, start + 1_234_567)
    assert (p.start_ns, p.end_ns) == (start + 1_234_567, start + 9_000_000)
    assert (d.start_ns, d.end_ns) == (start + 9_000_000, start + 9_000_000)
    assert all(s.parent_span_id == root.span_id and s.trace_id == root.trace_id for s in (q, p, d))
    assert q.attributes == {"loomserve.queue.position": 3}
    assert p.attributes == {"loomserve.prompt_tokens": 512, "loomserve.cached_tokens": 256}
    assert [(e.name, e.time_ns, e.attributes) for e in p.events] == [
        ("chunk", start + 2_000_000, {"tokens": 256}), ("chunk", start + 5_000_000, {})]
    assert p.status_code == STATUS_UNSET
    assert (d.status_code, d.status_message) == (STATUS_ERROR, "the worker group is down")
    assert queued.get_span_context().span_id == int(q.span_id, 16)
    assert failed.get_span_context().trace_id == int(root.trace_id, 16)


def test_past_interval_span_without_parent_starts_a_trace(receiver: OTLPReceiver) -> None:
    setup_tracing("scheduler", receiver.endpoint)
    now = time.time_ns()
    record_span("orphan", now - 10, now)
    shutdown_tracing()
    (span,) = receiver.wait_for_spans(1)
    assert span.parent_span_id is None


def test_past_interval_span_must_not_end_before_it_starts() -> None:
    with pytest.raises(ValueError, match="ends"):
        record_span("backwards", 10, 5)


@pytest.mark.parametrize("bad", [None, "", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
                                 "00-" + "a" * 32 + "-" + "0" * 16 + "-01"])
def test_missing_or_malformed_traceparent_starts_a_new_trace(receiver: OTLPReceiver, bad: str | None) -> None:
    setup_tracing("scheduler", receiver.endpoint)
    span = get_tracer("t").start_span("fresh", context=context_from_traceparent(bad))
    span.end()
    shutdown_tracing()
    (received,) = receiver.wait_for_spans(1)
    assert received.parent_span_id is None


def test_without_endpoint_nothing_is_recorded_and_parents_pass_through(receiver: OTLPReceiver) -> None:
    setup_tracing("gateway", receiver.endpoint)
    upstream = get_tracer("gateway").start_span("upstream")
    upstream_tp = inject_traceparent(upstream)
    upstream.end()
    shutdown_tracing()
    receiver.wait_for_spans(1)

    setup_tracing("scheduler", None)
    assert not tracing.tracing_enabled()
    root = get_tracer("scheduler").start_span("untraced root")
    assert inject_traceparent(root) is None  # nothing to pass on: no AddRequest.traceparent
    # A process with tracing off still hands its parent on, so the processes after it
    # that do trace stay in the caller's trace.
    child = get_tracer("scheduler").start_span("untraced child", context=context_from_traceparent(upstream_tp))
    assert inject_traceparent(child) == upstream_tp
    now = time.time_ns()
    record_span("untraced past", now - 10, now, parent=context_from_traceparent(upstream_tp))
    assert tracing.force_flush()
    shutdown_tracing()
    time.sleep(0.2)
    assert [s.name for s in receiver.spans] == ["upstream"]


def test_traces_url_appends_the_otlp_path_only_to_a_bare_address() -> None:
    assert tracing.traces_url("http://otel:4318") == "http://otel:4318/v1/traces"
    assert tracing.traces_url("http://otel:4318/") == "http://otel:4318/v1/traces"
    assert tracing.traces_url("http://otel:4318/v1/traces") == "http://otel:4318/v1/traces"
    assert tracing.traces_url("https://collector/custom/path") == "https://collector/custom/path"


def test_prompt_attributes_are_empty_without_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prompt_attributes("secret prompt") == {}  # before any setup
    setup_tracing("gateway", None)
    assert prompt_attributes("secret prompt") == {}
    monkeypatch.setenv(TRACE_PROMPTS_ENV, "0")
    setup_tracing("gateway", None)
    assert prompt_attributes("secret prompt") == {}


def test_prompt_attributes_with_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACE_PROMPTS_ENV, "1")
    setup_tracing("gateway", None)
    assert prompt_attributes("hello") == {PROMPT_ATTRIBUTE: "hello"}
    long = "x" * (PROMPT_ATTRIBUTE_MAX_CHARS + 10)
    assert prompt_attributes(long) == {PROMPT_ATTRIBUTE: long[:PROMPT_ATTRIBUTE_MAX_CHARS],
                                       PROMPT_ATTRIBUTE + ".truncated": True}
    # An explicit argument overrides the environment, both ways.
    setup_tracing("gateway", None, trace_prompts=False)
    assert prompt_attributes("hello") == {}
    monkeypatch.delenv(TRACE_PROMPTS_ENV)
    setup_tracing("gateway", None, trace_prompts=True)
    assert prompt_attributes("hello") == {PROMPT_ATTRIBUTE: "hello"}
    shutdown_tracing()
    assert prompt_attributes("hello") == {}


@pytest.mark.parametrize("flag", [None, "1"])
def test_exported_span_holds_prompt_text_only_with_the_flag(
    receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch, flag: str | None
) -> None:
    if flag is not None:
        monkeypatch.setenv(TRACE_PROMPTS_ENV, flag)
    setup_tracing("gateway", receiver.endpoint)
    span = get_tracer("gateway").start_span("request", attributes={"loomserve.tenant": "acme",
                                                                  **prompt_attributes("my secret prompt")})
    span.end()
    shutdown_tracing()
    (received,) = receiver.wait_for_spans(1)
    if flag is None:
        assert received.attributes == {"loomserve.tenant": "acme"}
    else:
        assert received.attributes == {"loomserve.tenant": "acme", PROMPT_ATTRIBUTE: "my secret prompt"}


def test_receiver_rejects_garbage(receiver: OTLPReceiver) -> None:
    r = httpx.post(receiver.endpoint, content=b"\xff\xff\xff not protobuf",
                   headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 400
    assert receiver.rejected == 1
    assert httpx.post(receiver.endpoint.replace("/v1/traces", "/v1/logs"), content=b"").status_code == 404
