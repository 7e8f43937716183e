"""The circuit breaker: one probe per back-off, doubling, and a cancelled probe handing over."""

from __future__ import annotations

from loomserve.gateway.circuit_breaker import CircuitBreaker


def test_breaker_probes_once_after_back_off() -> None:
    clock_value = [0.0]
    breaker = CircuitBreaker("test", base_backoff_s=1.0, max_backoff_s=4.0, clock=lambda: clock_value[0])
    assert breaker.allow()
    breaker.record_failure(ConnectionError("down"))
    breaker.record_failure(ConnectionError("another caller that was in flight"))
    assert not breaker.allow()
    clock_value[0] = 1.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.record_failure(ConnectionError("still down"))
    clock_value[0] = 2.5
    assert not breaker.allow()  # back-off doubled to 2 s
    clock_value[0] = 3.0
    assert breaker.allow()
    breaker.record_abandoned()  # the probe was cancelled: someone else may probe
    assert breaker.allow()
    breaker.record_success()
    assert breaker.allow() and breaker.allow() and not breaker.is_open
