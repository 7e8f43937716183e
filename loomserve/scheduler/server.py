"""The scheduler process: ZeroMQ in and out, one ``Scheduler`` step at a time.

    gateways --AddRequest/Abort/StatusQuery--> [ROUTER gateway_address]
    gateways <--RequestOutputs/SchedulerStatus--
    workers  --WorkerHello/WorkerReady/StepResult/WorkerFailure--> [ROUTER worker_address]
    workers  <--StepLimits/BatchPlan/Flush/Shutdown--

With asynchronous scheduling (the default) two plans are in flight: while the
workers compute step K+1, the result of step K comes back and the plan of step
K+2 goes out, so the GPU never waits for this process or the sockets. When
there is nothing to schedule, a ``Flush`` tells the workers to answer the plan
they hold. Without it, one plan is in flight at a time. Gateway messages that
arrive while plans are in flight are applied after the next result, so the
scheduler's state only changes between results. A result is followed at once
by the next plan; its outputs go to the gateways after that.

The worker group is watched three ways: a socket monitor sees a rank's
connection drop (process death), a ``WorkerFailure`` reports an exception, and
a step that outlives ``step_timeout_s`` counts as a hang. Any of them fails
every in-flight request at once and marks the group down until all ranks
register again.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import msgspec
import zmq
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span, Status, StatusCode
from zmq.utils.monitor import recv_monitor_message

from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.request import Request
from loomserve.scheduler.scheduler import AdmissionError, Scheduler
from loomserve.shared import messages as m
from loomserve.shared.config import SchedulerConfig
from loomserve.shared.tracing import (
    context_from_traceparent,
    get_tracer,
    inject_traceparent,
    record_span,
    setup_tracing,
    shutdown_tracing,
    tracing_enabled,
)

log = logging.getLogger(__name__)

_STATS_INTERVAL_S = 10.0
_EXPIRY_INTERVAL_S = 0.1


@dataclass
class _StepTimes:
    """Where a step's wall time went, summed over the steps since the last stats line:
    the time between consecutive results, the workers' ``forward_ms`` (a step's launch
    to its tokens read, overlapping the step before with asynchronous scheduling) with
    its two parts that say what bounds the workers (their own host work on the step,
    and their wait for the device to hand its tokens over), and this process's share
    (a result received to the next plan sent)."""

    steps: int = 0
    apart_s: float = 0.0
    apart_steps: int = 0
    executing_s: float = 0.0
    host_s: float = 0.0
    wait_s: float = 0.0
    between_s: float = 0.0
    between_steps: int = 0
    _result_at: float | None = None
    _last_result: float | None = None
    _chained = False  # the next step was in flight, or sent, when the last result came

    def finished(self, now: float, forward_ms: float, in_flight: bool, host_ms: float = 0.0,
                 wait_ms: float = 0.0) -> None:
        """A result came at ``now``; ``in_flight``: another plan is in flight."""
        self._result_at = now
        if self._chained and self._last_result is not None:
            self.apart_s += now - self._last_result
            self.apart_steps += 1
        self._last_result = now
        self._chained = in_flight
        self.steps += 1
        self.executing_s += forward_ms / 1000.0
        self.host_s += host_ms / 1000.0
        self.wait_s += wait_ms / 1000.0

    def launched(self, now: float) -> None:
        if self._result_at is not None:
            self.between_s += now - self._result_at
            self.between_steps += 1
            self._result_at = None
            self._chained = True

    def settled(self) -> None:
        """The result is handled; a plan launched later (after new requests) is not its next."""
        self._result_at = None

    def summary(self) -> str:
        if not self.steps:
            return "no steps"
        per_step = 1000 / self.steps
        return (f"{self.steps} steps: one every {1000 * self.apart_s / max(1, self.apart_steps):.2f} ms "
                f"({per_step * self.executing_s:.2f} ms launch to tokens in the workers, "
                f"{per_step * self.host_s:.2f} ms of their host work, {per_step * self.wait_s:.2f} ms waiting for "
                f"the device), {1000 * self.between_s / max(1, self.between_steps):.2f} ms here before the next plan")


class SchedulerServer:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._ctx = zmq.Context()
        self._gateway_sock = self._ctx.socket(zmq.ROUTER)
        self._gateway_sock.setsockopt(zmq.LINGER, 0)
        self._gateway_sock.bind(config.gateway_address)
        self._worker_sock = self._ctx.socket(zmq.ROUTER)
        self._worker_sock.setsockopt(zmq.LINGER, 0)
        self._worker_monitor = self._worker_sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self._worker_sock.bind(config.worker_address)
        self._encoder = m.encoder()

        self.scheduler: Scheduler | None = None
        self._ranks: dict[int, bytes] = {}  # rank -> routing id
        self._ready: dict[int, m.WorkerReady] = {}
        self._group_error: str | None = None
        self._owner: dict[str, bytes] = {}  # output id (request id, or a choice's) -> gateway routing id
        # Plans sent and not answered, oldest first, with when they were sent: at most
        # two with asynchronous scheduling, else one.
        self._in_flight: deque[tuple[m.BatchPlan, float]] = deque()
        self._depth = 2 if config.async_scheduling else 1
        # The workers hold the last lookahead plan's result until a plan or a Flush comes.
        self._worker_holds = False
        self._deferred: list[tuple[bytes, m.AddRequest | m.AbortRequest]] = []
        self._pending: list[tuple[bytes, m.AddRequest]] = []  # before the workers are ready
        self._stopping = False
        self._last_stats = time.monotonic()
        self._tokens_since_stats = 0
        self._step_times = _StepTimes()
        self._next_expiry_check = 0.0
        self._tracer = get_tracer("loomserve.scheduler")
        self._traced: dict[str, tuple[Span, Request]] = {}
        self._open_choices: dict[str, int] = {}  # traced requests of n > 1: choices not ended yet

    # -- lifecycle -----------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        for routing_id in self._ranks.values():
            self._send_worker(routing_id, m.Shutdown())
        self._worker_monitor.close(linger=0)
        self._gateway_sock.close(linger=0)
        self._worker_sock.close(linger=0)
        self._ctx.term()

    def run(self) -> None:
        log.info("scheduler listening: gateways at %s, workers at %s (waiting for %d rank(s))",
                 self.config.gateway_address, self.config.worker_address, self.config.tp)
        poller = zmq.Poller()
        poller.register(self._gateway_sock, zmq.POLLIN)
        poller.register(self._worker_sock, zmq.POLLIN)
        poller.register(self._worker_monitor, zmq.POLLIN)
        while not self._stopping:
            self._launch_steps()
            # State changes only with a message (or a queue deadline): nothing to do until one.
            timeout_ms = 200
            if self._in_flight:
                remaining = self._in_flight[0][1] + self.config.step_timeout_s - time.monotonic()
                if remaining <= 0:
                    self._group_down(f"a step took longer than {self.config.step_timeout_s:.0f} s")
                    continue
                timeout_ms = min(200, int(remaining * 1000) + 1)
            events = dict(poller.poll(timeout_ms))
            if self._worker_monitor in events:
                self._on_monitor_event()
            if self._worker_sock in events:
                self._drain_workers()
            if self._gateway_sock in events:
                self._drain_gateways()
            self._expire_waiting()
            self._log_stats()

    # -- gateways ------------------------------------------------------------

    def _drain_gateways(self) -> None:
        while True:
            try:
                routing_id, frame = self._gateway_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                log.warning("dropped a gateway message with an unexpected number of frames")
                continue
            try:
                msg = m.gateway_to_scheduler.decode(frame)
            except msgspec.DecodeError as e:
                log.warning("dropped an undecodable gateway frame (%d bytes): %s", len(frame), e)
                continue
            if isinstance(msg, m.StatusQuery):
                self._send_gateway(routing_id, self._status(msg.nonce))
            elif isinstance(msg, m.ResetPrefixCache):
                self._send_gateway(routing_id, self._reset_prefix_cache(msg.nonce))
            elif self._in_flight:
                self._deferred.append((routing_id, msg))
            else:
                self._apply(routing_id, msg)

    def _reset_prefix_cache(self, nonce: int) -> m.ControlReply:
        if self.scheduler is None:
            return m.ControlReply(nonce, False, "the worker group is not ready")
        if self._in_flight or not self.scheduler.kv_cache.reset_prefix_cache():
            return m.ControlReply(nonce, False, "KV blocks are in use; retry when the engine is idle")
        log.info("prefix cache reset")
        return m.ControlReply(nonce, True)

    def _apply(self, routing_id: bytes, msg: m.AddRequest | m.AbortRequest) -> None:
        if isinstance(msg, m.AbortRequest):
            if self.scheduler is not None:
                self._publish(self.scheduler.abort_requests(msg.request_ids))
            aborted = set(msg.request_ids)
            self._pending = [(r, a) for r, a in self._pending if a.request_id not in aborted]
            return
        if self._group_error is not None:
            self._reject(routing_id, msg, m.ErrorInfo(503, f"the worker group is down: {self._group_error}",
                                                      "engine_error"))
            return
        if self.scheduler is None:
            self._pending.append((routing_id, msg))
            return
        queue_timeout = msg.queue_timeout_s if msg.queue_timeout_s is not None else self.config.queue_timeout_s
        request = Request(
            request_id=msg.request_id,
            prompt_token_ids=msg.prompt_token_ids,
            sampling=msg.sampling,
            arrival_time=msg.arrival_time,
            queue_deadline=None if queue_timeout is None else time.time() + queue_timeout,
            priority=msg.priority,
            cache_salt=msg.tenant,
            traceparent=msg.traceparent,
            n=msg.n,
        )
        if msg.traceparent is not None and tracing_enabled():
            span = self._tracer.start_span("scheduler.request", context=context_from_traceparent(msg.traceparent),
                                           attributes={"loomserve.prompt_tokens": len(msg.prompt_token_ids),
                                                       "loomserve.n": msg.n})
            request.traceparent = inject_traceparent(span)  # the worker's spans become its children
            self._traced[msg.request_id] = (span, request)
            if msg.n > 1:
                self._open_choices[msg.request_id] = msg.n
        try:
            self.scheduler.add_request(request)
        except AdmissionError as e:
            self._open_choices.pop(msg.request_id, None)
            self._end_trace(msg.request_id, "error", e.error.message)
            self._reject(routing_id, msg, e.error)
            return
        for output_id in m.choice_request_ids(msg.request_id, msg.n):
            self._owner[output_id] = routing_id

    def _end_trace(self, output_id: str, finish_reason: str, error: str | None) -> None:
        """Queue wait, prefill and decode as child spans of the request's span, preemptions as events.

        A request of n > 1 choices has one span, ended with its last choice; its decode
        span runs from the first token of any choice."""
        if not self._traced:
            return
        request_id, _, _ = output_id.partition(m.CHOICE_SEPARATOR)
        if request_id in self._open_choices:
            self._open_choices[request_id] -= 1
            if self._open_choices[request_id] > 0:
                return
            del self._open_choices[request_id]
        traced = self._traced.pop(request_id, None)
        if traced is None:
            return
        span, request = traced
        now = time.time_ns()
        parent = trace.set_span_in_context(span)
        arrived = span.start_time if isinstance(span, ReadableSpan) and span.start_time else now
        scheduled = request.first_scheduled_ns or now
        record_span("scheduler.queue", arrived, max(arrived, scheduled), parent)
        if request.first_scheduled_ns is not None:
            first_token = request.first_token_ns or now
            record_span("scheduler.prefill", scheduled, max(scheduled, first_token), parent,
                        attributes={"loomserve.cached_tokens": request.num_cached_tokens})
            if request.first_token_ns is not None:
                record_span("scheduler.decode", first_token, max(first_token, now), parent,
                            attributes={"loomserve.output_tokens": request.num_output_tokens})
        for at in request.preempted_ns:
            span.add_event("preempted", timestamp=at)
        span.set_attribute("loomserve.finish_reason", finish_reason)
        if error is not None and finish_reason == "error":
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=now)

    def _reject(self, routing_id: bytes, add: m.AddRequest, error: m.ErrorInfo) -> None:
        outs = [m.RequestOutput(i, [], "error", error=error) for i in m.choice_request_ids(add.request_id, add.n)]
        self._send_gateway(routing_id, m.RequestOutputs(outs))

    def _publish(self, outputs: list[m.RequestOutput]) -> None:
        by_gateway: dict[bytes, list[m.RequestOutput]] = defaultdict(list)
        owner = self._owner
        num_tokens = 0
        for out in outputs:
            routing_id = owner.get(out.request_id)
            if routing_id is None:
                continue
            if out.finish_reason is not None:
                del owner[out.request_id]
                self._end_trace(out.request_id, out.finish_reason, out.error.message if out.error else None)
            by_gateway[routing_id].append(out)
            num_tokens += len(out.new_token_ids)
        self._tokens_since_stats += num_tokens
        for routing_id, outs in by_gateway.items():
            self._send_gateway(routing_id, m.RequestOutputs(outs))

    def _send_gateway(self, routing_id: bytes, msg: m.SchedulerToGateway) -> None:
        try:
            self._gateway_sock.send_multipart([routing_id, self._encoder.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not reach a gateway: %s", e)

    def _status(self, nonce: int) -> m.SchedulerStatus:
        sched = self.scheduler
        ready = sched is not None and self._group_error is None
        first = self._ready.get(0)
        return m.SchedulerStatus(
            nonce=nonce,
            workers_ready=ready,
            error=self._group_error,
            num_waiting=sched.num_waiting if sched else len(self._pending),
            num_running=sched.num_running if sched else 0,
            num_free_blocks=sched.kv_cache.num_free_blocks if sched else 0,
            num_total_blocks=sched.kv_cache.num_blocks if sched else 0,
            model=first.model if first else "",
            device=first.device if first else "",
            max_model_len=sched.max_model_len if sched else 0,
            num_preemptions=sched.stats.num_preemptions if sched else 0,
            prefix_cache_queries=sched.kv_cache.prefix_cache_queries if sched else 0,
            prefix_cache_hits=sched.kv_cache.prefix_cache_hits if sched else 0,
            num_steps=sched.stats.num_steps if sched else 0,
            num_scheduled_tokens=sched.stats.num_scheduled_tokens if sched else 0,
            num_forks=sched.stats.num_forks if sched else 0,
            num_block_copies=sched.stats.num_block_copies if sched else 0,
        )

    # -- workers -------------------------------------------------------------

    def _send_worker(self, routing_id: bytes, msg: m.StepLimits | m.BatchPlan | m.Shutdown) -> None:
        try:
            self._worker_sock.send_multipart([routing_id, self._encoder.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not reach a worker: %s", e)

    def _launch_steps(self) -> None:
        """Send plans until ``_depth`` are in flight or nothing is left to schedule; in the
        latter case a worker holding a lookahead plan is told to answer it."""
        if self.scheduler is None or self._group_error is not None:
            return
        while len(self._in_flight) < self._depth:
            plan = self.scheduler.schedule()
            if plan is None:
                if self._worker_holds:
                    self._worker_holds = False
                    self._broadcast(self._encoder.encode(m.Flush()))
                return
            self._broadcast(self._encoder.encode(plan))
            self._worker_holds = plan.lookahead
            now = time.monotonic()
            self._in_flight.append((plan, now))
            self._step_times.launched(now)

    def _broadcast(self, payload: bytes) -> None:
        for routing_id in self._ranks.values():
            self._worker_sock.send_multipart([routing_id, payload], copy=False)

    def _drain_workers(self) -> None:
        while True:
            try:
                routing_id, frame = self._worker_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                log.warning("dropped a worker message with an unexpected number of frames")
                continue
            try:
                msg = m.worker_to_scheduler.decode(frame)
            except msgspec.DecodeError as e:
                log.warning("dropped an undecodable worker frame (%d bytes): %s", len(frame), e)
                continue
            if isinstance(msg, m.WorkerHello):
                self._send_worker(routing_id, self.config.step_limits())
            elif isinstance(msg, m.WorkerReady):
                self._on_worker_ready(routing_id, msg)
            elif isinstance(msg, m.StepResult):
                self._on_step_result(msg)
            elif isinstance(msg, m.WorkerFailure):
                self._group_down(f"rank {msg.rank} failed: {msg.message}")

    def _on_worker_ready(self, routing_id: bytes, msg: m.WorkerReady) -> None:
        if msg.world_size != self.config.tp:
            log.error("rank %d reports a group of %d, expected %d (--tp); ignored",
                      msg.rank, msg.world_size, self.config.tp)
            return
        self._ranks[msg.rank] = routing_id
        self._ready[msg.rank] = msg
        if len(self._ready) < self.config.tp:
            return
        head = self._ready[0]
        gc.unfreeze()  # a pool of an earlier worker group is garbage now (its free queue is cyclic)
        kv_cache = KVCacheManager(
            num_blocks=min(r.num_kv_blocks for r in self._ready.values()),
            block_size=head.block_size,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(self.config, kv_cache, head.max_model_len)
        # The block pool is ~num_blocks long-lived objects that never form garbage cycles:
        # frozen, full collections no longer walk them (at 65k blocks a full collection
        # took ~24 ms, every few hundred steps).
        gc.collect()
        gc.freeze()
        self._group_error = None
        log.info("worker group ready: %d rank(s), model %s on %s, %d KV blocks of %d tokens, "
                 "max model length %d", self.config.tp, head.model, head.device,
                 kv_cache.num_blocks, head.block_size, head.max_model_len)
        if 0 < head.graph_max_seqs < self.config.max_num_seqs:
            log.warning("the workers were started with --cuda-graph-max-seqs %d: steps of more sequences "
                        "(up to --max-num-seqs %d) run eagerly, slower", head.graph_max_seqs,
                        self.config.max_num_seqs)
        pending, self._pending = self._pending, []
        for gateway_id, add in pending:
            self._apply(gateway_id, add)

    def _on_step_result(self, result: m.StepResult) -> None:
        if not self._in_flight or self.scheduler is None:
            return
        plan, _ = self._in_flight[0]
        if result.step_id != plan.step_id:
            log.warning("dropped a result for step %d while waiting for step %d", result.step_id, plan.step_id)
            return
        self._in_flight.popleft()
        self._step_times.finished(time.monotonic(), result.forward_ms, in_flight=bool(self._in_flight),
                                  host_ms=result.host_ms, wait_ms=result.wait_ms)
        outputs = self.scheduler.update_from_output(result)
        deferred, self._deferred = self._deferred, []
        for routing_id, msg in deferred:
            self._apply(routing_id, msg)
        # The next plan goes out before the outputs, so that the worker group computes
        # while this process encodes and sends them (and ends their traces).
        self._launch_steps()
        self._step_times.settled()
        self._publish(outputs)

    def _on_monitor_event(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._worker_monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self._ranks:
                self._group_down("a worker rank disconnected (its process exited)")

    def _group_down(self, reason: str) -> None:
        log.error("worker group down: %s; failing all in-flight requests", reason)
        self._group_error = reason
        self._in_flight.clear()
        self._worker_holds = False
        self._ranks.clear()
        self._ready.clear()
        message = f"the worker group is down: {reason}"
        if self.scheduler is not None:
            self._publish(self.scheduler.fail_all(message))
        self.scheduler = None
        error = m.ErrorInfo(503, message, "engine_error")
        deferred, self._deferred = self._deferred, []
        pending, self._pending = self._pending, []
        for routing_id, msg in deferred + pending:
            if isinstance(msg, m.AddRequest):
                self._reject(routing_id, msg, error)

    def _expire_waiting(self) -> None:
        now = time.time()
        if self.scheduler is None or now < self._next_expiry_check:
            return
        self._next_expiry_check = now + _EXPIRY_INTERVAL_S
        self._publish(self.scheduler.expire_waiting(now))

    def _log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < _STATS_INTERVAL_S:
            return
        sched = self.scheduler
        if sched is not None and (sched.has_work() or self._tokens_since_stats):
            kv = sched.kv_cache
            log.info("%.1f tokens/s out, %d running, %d waiting, KV %d/%d blocks used, %d preemptions; %s",
                     self._tokens_since_stats / (now - self._last_stats), sched.num_running,
                     sched.num_waiting, kv.num_used_blocks, kv.num_blocks, sched.stats.num_preemptions,
                     self._step_times.summary())
        self._last_stats = now
        self._tokens_since_stats = 0
        self._step_times = _StepTimes()


def serve_scheduler(config: SchedulerConfig) -> None:
    from loomserve.shared.process import install_stop_handler, parent_watchdog

    setup_tracing("loomserve-scheduler", config.otlp_endpoint)
    server = SchedulerServer(config)
    install_stop_handler(server.stop)
    parent_watchdog(int(os.environ.get("LOOMSERVE_SUPERVISOR_PID", "0")), server.stop)
    try:
        server.run()
    finally:
        server.close()
        shutdown_tracing()
        log.info("scheduler stopped")
