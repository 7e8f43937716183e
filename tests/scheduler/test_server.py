"""The scheduler process's sockets: garbage is dropped and logged, never trusted."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from loomserve.scheduler.server import SchedulerServer, _StepTimes
from loomserve.shared import messages as m
from loomserve.shared.config import SchedulerConfig
from tests.stack import free_port


@contextlib.contextmanager
def running_server(config: SchedulerConfig) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A scheduler server on a thread, and a gateway and a worker socket connected to it."""
    server = SchedulerServer(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    ctx = zmq.Context()
    gateway, worker = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        gateway.connect(config.gateway_address)
        worker.connect(config.worker_address)
        yield gateway, worker
    finally:
        server.stop()
        thread.join(5)
        server.close()
        gateway.close(linger=0)
        worker.close(linger=0)
        ctx.term()


def test_garbage_frames_are_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    config = SchedulerConfig(gateway_address=f"tcp://127.0.0.1:{free_port()}",
                             worker_address=f"tcp://127.0.0.1:{free_port()}")
    caplog.set_level(logging.WARNING, logger="loomserve.scheduler.server")
    with running_server(config) as (gateway, worker):
        gateway.send(b"\x93\xff garbage")
        gateway.send_multipart([b"two", b"frames"])
        worker.send(b"\x00\x01")
        # a message of the wrong socket's union does not decode either
        gateway.send(m.encoder().encode(m.Shutdown()))
        gateway.send(m.encoder().encode(m.StatusQuery(nonce=7)))
        assert gateway.poll(5000), "the scheduler stopped answering after garbage"
        status = m.scheduler_to_gateway.decode(gateway.recv())
        assert isinstance(status, m.SchedulerStatus) and status.nonce == 7
        assert not status.workers_ready
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) >= 3, dropped


def test_the_trace_of_a_request_with_choices_ends_with_its_last_choice() -> None:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

    from loomserve.scheduler.request import Request

    config = SchedulerConfig(gateway_address=f"tcp://127.0.0.1:{free_port()}",
                             worker_address=f"tcp://127.0.0.1:{free_port()}")
    server = SchedulerServer(config)
    try:
        span = TracerProvider().get_tracer("test").start_span("scheduler.request")
        assert isinstance(span, ReadableSpan)
        server._traced["p"] = (span, Request("p", [1, 2], m.SamplingParams(max_tokens=3), n=3))
        server._open_choices["p"] = 3
        for choice in ("p#0", "p#2"):
            server._end_trace(choice, "length", None)
            assert span.end_time is None
        server._end_trace("p#1", "stop", None)
        assert span.end_time is not None
        assert "p" not in server._traced and "p" not in server._open_choices
    finally:
        server.close()


def test_step_times_split_a_step_between_the_workers_and_the_scheduler() -> None:
    """The stats line's step accounting: results apart while the engine is busy (a plan in
    flight when a result comes, or sent right after it), the workers' launch-to-tokens time,
    and result to the next plan here; an idle spell counts in neither."""
    times = _StepTimes()
    assert times.summary() == "no steps"
    times.finished(100.000, forward_ms=4.0, in_flight=False, host_ms=1.0, wait_ms=2.5)  # one step at a time:
    times.launched(100.002)  # the next plan 2 ms after the result
    times.settled()
    # 14 ms apart; a lookahead plan in flight
    times.finished(100.014, forward_ms=6.0, in_flight=True, host_ms=3.0, wait_ms=0.5)
    times.settled()
    times.finished(100.024, forward_ms=8.0, in_flight=False)  # 10 ms apart; nothing left to run
    times.settled()  # the next launch is not timed against this result
    times.launched(105.0)
    times.finished(105.010, forward_ms=8.0, in_flight=False)  # after an idle spell: not counted apart
    summary = times.summary()
    assert times.steps == 4 and times.between_steps == 1 and times.apart_steps == 2
    assert times.apart_s == pytest.approx(0.024) and times.between_s == pytest.approx(0.002)
    assert times.executing_s == pytest.approx(0.026)
    assert summary == ("4 steps: one every 12.00 ms (6.50 ms launch to tokens in the workers, 1.00 ms of their "
                       "host work, 0.75 ms waiting for the device), 2.00 ms here before the next plan")


def test_a_worker_hello_is_answered_with_the_schedulers_step_limits() -> None:
    config = SchedulerConfig(gateway_address=f"tcp://127.0.0.1:{free_port()}",
                             worker_address=f"tcp://127.0.0.1:{free_port()}", max_num_seqs=48,
                             max_num_batched_tokens=3000)
    with running_server(config) as (_, worker):
        for rank in (0, 1):
            worker.send(m.encoder().encode(m.WorkerHello(rank=rank, world_size=2)))
            assert worker.poll(5000), "no answer to the hello"
            assert m.scheduler_to_worker.decode(worker.recv()) == m.StepLimits(3000, 48)


@pytest.mark.parametrize(("graph_max_seqs", "warned"), [(0, False), (256, True), (512, False), (600, False)])
def test_workers_with_graphs_smaller_than_max_num_seqs_are_logged(graph_max_seqs: int, warned: bool,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A worker started with --cuda-graph-max-seqs below --max-num-seqs runs the larger steps
    eagerly: the scheduler says so. A worker without graphs (0, a CPU) is not warned about."""
    config = SchedulerConfig(gateway_address=f"tcp://127.0.0.1:{free_port()}",
                             worker_address=f"tcp://127.0.0.1:{free_port()}", max_num_seqs=512)
    caplog.set_level(logging.INFO, logger="loomserve.scheduler.server")
    with running_server(config) as (gateway, worker):
        worker.send(m.encoder().encode(m.WorkerReady(0, 1, 64, 16, 1024, "test", "cuda:0", graph_max_seqs)))
        deadline = time.monotonic() + 10
        while True:
            gateway.send(m.encoder().encode(m.StatusQuery(nonce=1)))
            assert gateway.poll(5000)
            status = m.scheduler_to_gateway.decode(gateway.recv())
            if isinstance(status, m.SchedulerStatus) and status.workers_ready:
                break
            assert time.monotonic() < deadline, "the worker group never became ready"
            time.sleep(0.02)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "--cuda-graph-max-seqs" in r.getMessage()]
    if warned:
        assert warnings == ["the workers were started with --cuda-graph-max-seqs 256: steps of more sequences "
                            "(up to --max-num-seqs 512) run eagerly, slower"]
    else:
        assert warnings == []


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_plans_in_flight_and_the_flush_over_real_sockets(async_scheduling: bool) -> None:
    """A worker played by the test: with asynchronous scheduling the second plan (the decode
    of the token being sampled) comes before any result, and after the first result a Flush,
    since the request's last token is in flight; one step at a time, each plan waits for the
    previous result and no Flush is ever sent."""
    config = SchedulerConfig(gateway_address=f"tcp://127.0.0.1:{free_port()}",
                             worker_address=f"tcp://127.0.0.1:{free_port()}", async_scheduling=async_scheduling)
    encoder = m.encoder()

    def next_message(sock: zmq.Socket, decoder: Any, timeout_ms: int = 5000) -> Any:
        assert sock.poll(timeout_ms), "nothing came"
        return decoder.decode(sock.recv())

    with running_server(config) as (gateway, worker):
        worker.send(encoder.encode(m.WorkerReady(0, 1, 64, 16, 1024, "test", "cpu")))
        sampling = m.SamplingParams(max_tokens=2, temperature=0.0)
        gateway.send(encoder.encode(m.AddRequest("a", [1, 2, 3], sampling, arrival_time=0.0)))
        first = next_message(worker, m.scheduler_to_worker)
        assert isinstance(first, m.BatchPlan) and first.num_scheduled_tokens == {"a": 3}
        assert first.lookahead is async_scheduling
        if async_scheduling:
            second = next_message(worker, m.scheduler_to_worker)
            assert isinstance(second, m.BatchPlan) and second.num_scheduled_tokens == {"a": 1}
            # The worker answers the first plan once the second is launched; with the
            # request's last token in flight nothing follows, so the scheduler asks for it.
            worker.send(encoder.encode(m.StepResult(first.step_id, ["a"], [[7]])))
            assert isinstance(next_message(worker, m.scheduler_to_worker), m.Flush)
        else:
            assert not worker.poll(300), "a second plan came before the first result"
            worker.send(encoder.encode(m.StepResult(first.step_id, ["a"], [[7]])))
            second = next_message(worker, m.scheduler_to_worker)
            assert isinstance(second, m.BatchPlan) and second.num_scheduled_tokens == {"a": 1}
        worker.send(encoder.encode(m.StepResult(second.step_id, ["a"], [[8]])))
        tokens, reason = [], None
        while reason is None:
            outputs = next_message(gateway, m.scheduler_to_gateway)
            assert isinstance(outputs, m.RequestOutputs)
            for out in outputs.outputs:
                tokens += out.new_token_ids
                reason = out.finish_reason
        assert (tokens, reason) == ([7, 8], "length")
        assert not worker.poll(300)  # nothing left: no plan, and no Flush one step at a time
