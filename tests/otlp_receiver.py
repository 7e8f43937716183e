"""A minimal OTLP/HTTP trace collector for tests.

It listens on a free 127.0.0.1 port in a background thread, accepts
``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` body (gzip or
not), and keeps every span it receives as a ``ReceivedSpan``. Tests point
``setup_tracing`` at ``receiver.endpoint`` and wait with ``wait_for_spans``.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None  # None for a root span
    start_ns: int
    end_ns: int
    kind: int
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    events: list[ReceivedEvent]
    service_name: str | None
    scope: str


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = _value(kv.value)
    return out


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(ReceivedSpan(
                    name=s.name,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex() or None,
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    kind=s.kind,
                    status_code=s.status.code,
                    status_message=s.status.message,
                    attributes=_attributes(s.attributes),
                    events=[ReceivedEvent(e.name, e.time_unix_nano, _attributes(e.attributes)) for e in s.events],
                    service_name=service,
                    scope=scope_spans.scope.name,
                ))
    return spans


@dataclass
class _Store:
    cond: threading.Condition = field(default_factory=threading.Condition)
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    rejected: int = 0


class _Handler(BaseHTTPRequestHandler):
    store: _Store  # set on the subclass made per receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if self.path.split("?", 1)[0] != TRACES_PATH:
            self._answer(404, b"")
            return
        try:
            if self.headers.get("content-encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            spans = decode_spans(body)
        except (DecodeError, OSError) as e:
            log.warning("OTLP receiver: undecodable export (%d bytes): %s", len(body), e)
            with self.store.cond:
                self.store.rejected += 1
            self._answer(400, b"")
            return
        with self.store.cond:
            self.store.spans.extend(spans)
            self.store.requests += 1
            self.store.cond.notify_all()
        self._answer(200, ExportTraceServiceResponse().SerializeToString())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("OTLP receiver: " + format, *args)


class OTLPReceiver:
    """Use as a context manager: ``with OTLPReceiver() as rx: ... rx.wait_for_spans(3)``."""

    def __init__(self) -> None:
        self._store = _Store()
        handler = type("Handler", (_Handler,), {"store": self._store})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll interval: shutdown() waits up to one interval, and tests stop many receivers.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="otlp-receiver", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The full traces URL, for ``setup_tracing``."""
        return f"http://127.0.0.1:{self.port}{TRACES_PATH}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._store.cond:
            return list(self._store.spans)

    @property
    def rejected(self) -> int:
        with self._store.cond:
            return self._store.rejected

    def start(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def clear(self) -> None:
        with self._store.cond:
            self._store.spans.clear()

    def wait_for_spans(self, count: int, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """Every span received once there are at least ``count``; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._store.cond:
            while len(self._store.spans) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [s.name for s in self._store.spans]
                    raise AssertionError(f"expected {count} spans within {timeout_s} s, got {len(names)}: {names}")
                self._store.cond.wait(remaining)
            return list(self._store.spans)

    def by_name(self, name: str) -> ReceivedSpan:
        matches = [s for s in self.spans if s.name == name]
        if len(matches) != 1:
            raise AssertionError(f"expected one span named {name!r}, got {len(matches)}")
        return matches[0]

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
