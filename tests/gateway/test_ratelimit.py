"""GCRA rate limits: the math, the Lua script, replicas sharing Redis, refunds, and Redis failures.

Every Redis here is a throwaway redis-server (tests/redis_server.py), so tests can stop or
pause it without touching anyone else's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from loomserve.gateway.auth import Principal
from loomserve.gateway.limits import Limits
from loomserve.gateway.protocol import APIError
from loomserve.gateway.ratelimit import (
    GCRA_LUA,
    Admission,
    FailMode,
    LocalRateLimiter,
    RateLimiter,
    RateLimitExceeded,
    RedisRateLimiter,
    format_duration,
    gcra_refund,
    gcra_take,
)
from loomserve.gateway.services import build_limiter
from loomserve.shared.config import GatewayConfig
from tests.gateway.redis_clients import redis_client
from tests.redis_server import RedisServer

BASE_S = 1_700_000_000.0  # a fixed "now" for clock-driven tests; exact in microseconds as a double


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server this test alone may stop, restart or pause."""
    with RedisServer() as server:
        yield server


def principal(tenant: str = "acme", limits: Limits | None = None) -> Principal:
    return Principal(tenant, "ci", "0123456789ab", limits)


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


class FakeClock:
    """Seconds, set by the test: the same offsets drive the local limiter and the Lua script."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return BASE_S + self.offset


# -- the GCRA table -------------------------------------------------------------
#
# 60 units per minute (interval 1 s), burst 3 (tolerance 3 s). Rows run in order on one bucket:
# (offset s, quantity) -> (allowed, retry_after s, remaining, reset_after s)
GCRA_LIMIT, GCRA_BURST = 60, 3
GCRA_TABLE = [
    ((0.0, 1), (True, 0.0, 2, 1.0)),  # idle: burst of 3 available
    ((0.0, 1), (True, 0.0, 1, 2.0)),
    ((0.0, 1), (True, 0.0, 0, 3.0)),  # burst used up
    ((0.0, 1), (False, 1.0, 0, 3.0)),  # one interval until the next unit
    ((0.5, 1), (False, 0.5, 0, 2.5)),  # half of it has passed
    ((1.0, 1), (True, 0.0, 0, 3.0)),  # exactly on time
    ((1.0, 2), (False, 2.0, 0, 3.0)),  # two units wait two intervals
    ((3.0, 2), (True, 0.0, 0, 3.0)),
    ((3.0, 0), (True, 0.0, 0, 3.0)),  # taking nothing is always allowed and changes nothing
    ((10.0, 3), (True, 0.0, 0, 3.0)),  # idle again: a whole burst at once
    ((11.5, 1), (True, 0.0, 0, 2.5)),  # remaining: 1.5 units have come back, 1 taken, floor(0.5) = 0
    ((13.5, 1), (True, 0.0, 1, 1.5)),
    ((20.0, 4), (False, 1.0, 3, 0.0)),  # above the burst: the raw math never lets it through
]


def test_gcra_math_table() -> None:
    interval, tolerance = 60.0 / GCRA_LIMIT, GCRA_BURST * 60.0 / GCRA_LIMIT
    tat: float | None = None
    for (offset, quantity), expected in GCRA_TABLE:
        state, new_tat = gcra_take(tat, BASE_S + offset, interval, tolerance, quantity)
        assert (state.allowed, state.retry_after_s, state.remaining, state.reset_after_s) == expected, (
            offset, quantity)
        if state.allowed:
            tat = new_tat


def test_gcra_refund_never_goes_below_now() -> None:
    assert gcra_refund(BASE_S + 3.0, BASE_S, 1.0, 2) == BASE_S + 1.0
    assert gcra_refund(BASE_S + 3.0, BASE_S, 1.0, 10) == BASE_S
    assert gcra_refund(None, BASE_S, 1.0, 1) == BASE_S


def test_lua_script_table(redis_server: RedisServer) -> None:
    """The same table through the script, its clock driven by ARGV[2]."""
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        script = client.register_script(GCRA_LUA)
        key = unique_prefix() + "bucket"
        interval_us, tolerance_us = 60e6 / GCRA_LIMIT, GCRA_BURST * 60e6 / GCRA_LIMIT
        try:
            for (offset, quantity), (allowed, retry, remaining, reset) in GCRA_TABLE:
                now_us = (BASE_S + offset) * 1e6
                reply = await script(keys=[key], args=["take", repr(now_us), repr(interval_us),
                                                       repr(tolerance_us), quantity])
                assert reply == [int(allowed), int(allowed), round(retry * 1e6), remaining, round(reset * 1e6)], (
                    offset, quantity)
            # The stored TAT (15 s) expires when the bucket is full again; PX is relative, so real time works.
            assert 0 < await client.pttl(key) <= 1500
            # A refund at 20 s finds the bucket already full: never below now, so the key goes.
            await script(keys=[key], args=["refund", repr((BASE_S + 20.0) * 1e6), repr(interval_us), "0", 1])
            assert await client.exists(key) == 0
        finally:
            await client.aclose()

    asyncio.run(run())


def test_lua_script_is_all_or_nothing(redis_server: RedisServer) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        script = client.register_script(GCRA_LUA)
        roomy, tight = unique_prefix() + "roomy", unique_prefix() + "tight"
        now = repr(BASE_S * 1e6)
        try:
            # roomy: burst 10; tight: burst 1. Two takes of 1: the second is refused by tight alone.
            args: list[str | int] = ["take", now, "1000000", "10000000", 1, "1000000", "1000000", 1]
            assert (await script(keys=[roomy, tight], args=args))[0] == 1
            reply = await script(keys=[roomy, tight], args=args)
            assert reply[0] == 0
            assert reply[1:5] == [1, 0, 9, 1_000_000]  # roomy would allow, reports itself untouched...
            stored = await client.get(roomy)
            assert stored is not None and float(stored) == BASE_S * 1e6 + 1e6  # ...and was not charged
        finally:
            await client.aclose()

    asyncio.run(run())


# -- the same behaviour through both limiters, clock-driven ----------------------

@contextlib.asynccontextmanager
async def redis_limiter(url: str, limits: Limits, **options: Any) -> AsyncIterator[RedisRateLimiter]:
    """A Redis limiter on a client of its own, as one gateway replica has; closed on exit."""
    async with redis_client(url) as shared:
        limiter = RedisRateLimiter(shared, limits, **options)
        try:
            yield limiter
        finally:
            await limiter.aclose()


@contextlib.asynccontextmanager
async def replicas(url: str, limits: Limits, **options: Any) -> AsyncIterator[list[RedisRateLimiter]]:
    """4 Redis limiters on clients of their own, like 4 gateway replicas."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(redis_limiter(url, limits, **options)) for _ in range(4)]


@contextlib.asynccontextmanager
async def limiter_of(kind: str, url: str, limits: Limits, clock: Callable[[], float]) -> AsyncIterator[RateLimiter]:
    if kind == "local":
        local = LocalRateLimiter(limits, clock=clock)
        try:
            yield local
        finally:
            await local.aclose()
        return
    async with redis_limiter(url, limits, key_prefix=unique_prefix(), clock=clock, timeout_s=1.0) as limiter:
        yield limiter


async def outcome(limiter: RateLimiter, who: Principal, tokens: int) -> tuple[bool, float]:
    try:
        await limiter.admit(who, tokens)
    except RateLimitExceeded as e:
        return False, e.retry_after_s
    return True, 0.0


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_limiter_table(kind: str, redis_server: RedisServer) -> None:
    """GCRA_TABLE as token charges, plus the request that can never fit."""
    async def run() -> None:
        clock = FakeClock()
        async with limiter_of(kind, redis_server.url, Limits(tokens_per_minute=GCRA_LIMIT, token_burst=GCRA_BURST),
                              clock) as limiter:
            for (offset, quantity), (allowed, retry, _, _) in GCRA_TABLE[:-1]:
                clock.offset = offset
                got_allowed, got_retry = await outcome(limiter, principal(), quantity)
                assert got_allowed == allowed, (offset, quantity)
                assert got_retry == pytest.approx(retry, abs=1e-6), (offset, quantity)
            clock.offset = 20.0
            with pytest.raises(APIError) as refused:
                await limiter.admit(principal(), GCRA_BURST + 1)
            assert refused.value.status == 400
            assert "4 tokens" in refused.value.message and "burst of 3 tokens" in refused.value.message
            assert "retry-after" not in refused.value.headers

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_denial_is_a_complete_429(kind: str, redis_server: RedisServer) -> None:
    async def run() -> None:
        clock = FakeClock()
        # Intervals of 1 s and 1/128 s: exact in binary, so the expected counts are exact.
        limits = Limits(requests_per_minute=60, request_burst=2, tokens_per_minute=7680, token_burst=1280)
        async with limiter_of(kind, redis_server.url, limits, clock) as limiter:
            first = await limiter.admit(principal(), 128)
            assert first.headers == {
                "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "1",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-limit-tokens": "7680", "x-ratelimit-remaining-tokens": "1152",
                "x-ratelimit-reset-tokens": "1s",
            }
            await limiter.admit(principal(), 128)
            clock.offset = 0.25
            with pytest.raises(RateLimitExceeded) as denied:
                await limiter.admit(principal(), 128)
            e = denied.value
            assert e.status == 429 and e.type == "requests" and e.code == "rate_limit_exceeded"
            assert e.body()["error"]["param"] is None
            assert e.retry_after_s == pytest.approx(0.75, abs=1e-6)
            assert e.headers["retry-after"] == "1" and e.headers["retry-after-ms"] == "750"
            assert e.headers["x-ratelimit-remaining-requests"] == "0"
            assert e.headers["x-ratelimit-reset-requests"] == "1.75s"
            # Tokens would allow but were not charged: 256 taken, 0.25 s (32 tokens) back.
            assert e.headers["x-ratelimit-remaining-tokens"] == "1056"
            assert e.headers["x-ratelimit-reset-tokens"] == "1.75s"
            assert "tenant 'acme'" in e.message and "limit 60, burst 2" in e.message

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_key_limits_apply_on_top_of_the_tenant(kind: str, redis_server: RedisServer) -> None:
    async def run() -> None:
        clock = FakeClock()
        limits = Limits(requests_per_minute=60, request_burst=10)
        async with limiter_of(kind, redis_server.url, limits, clock) as limiter:
            strict_key = Principal("acme", "strict", "aaaaaaaaaaaa", Limits(requests_per_minute=60, request_burst=2))
            other_key = Principal("acme", "other", "bbbbbbbbbbbb", None)
            assert [(await outcome(limiter, strict_key, 0))[0] for _ in range(3)] == [True, True, False]
            with pytest.raises(RateLimitExceeded) as denied:
                await limiter.admit(strict_key, 0)
            assert "key 'strict' of tenant 'acme'" in denied.value.message
            # The key's refusal charged nothing: the tenant has 8 of its 10 left.
            assert [(await outcome(limiter, other_key, 0))[0] for _ in range(9)] == [True] * 8 + [False]
            assert (await outcome(limiter, principal("globex"), 0))[0]  # tenants are separate

    asyncio.run(run())


def test_unlimited_principal_needs_no_store() -> None:
    async def run() -> None:
        async with redis_limiter("redis://127.0.0.1:1/0", Limits(), key_prefix=unique_prefix()) as limiter:
            admission = await limiter.admit(principal(), 10**9)
            assert admission.checked and admission.headers == {} and admission.reserved_tokens == 0
            assert limiter.stats.store_calls == 0

    asyncio.run(run())


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.0, 0.0201, 0.999, 1.0, 1.5, 59.9986, 59.9994, 360.0, 61.25)] == [
        "0ms", "21ms", "999ms", "1s", "1.5s", "59.999s", "1m0s", "6m0s", "1m1.25s"]  # rounded up


# -- replicas sharing one Redis ---------------------------------------------------

def test_replicas_share_one_limit(redis_server: RedisServer) -> None:
    """4 limiters (separate clients, like 4 gateway replicas) x 4 tasks hammer one tenant."""
    limit, burst, duration_s = 600, 20, 2.0  # one request per 0.1 s after the burst
    prefix = unique_prefix()

    async def run() -> tuple[list[float], float, list[RedisRateLimiter]]:
        async with replicas(redis_server.url, Limits(requests_per_minute=limit, request_burst=burst),
                            key_prefix=prefix, timeout_s=1.0) as limiters:
            admitted: list[float] = []
            start = time.monotonic()

            async def hammer(limiter: RedisRateLimiter) -> None:
                while time.monotonic() - start < duration_s:
                    try:
                        await limiter.admit(principal(), 1)
                        admitted.append(time.monotonic())
                    except RateLimitExceeded:
                        pass
                    await asyncio.sleep(0.005)

            await asyncio.gather(*(hammer(lim) for lim in limiters for _ in range(4)))
            return admitted, time.monotonic() - start, limiters

    admitted, elapsed, limiters = asyncio.run(run())
    assert all(lim.stats.store_failures == 0 and lim.stats.admitted_unchecked == 0 for lim in limiters)
    steady = elapsed * limit / 60
    assert len(admitted) <= burst + steady + 1
    assert len(admitted) >= burst + 0.6 * steady  # and it does not starve them either
    assert sum(lim.stats.store_calls for lim in limiters) > len(admitted)  # there was contention


def test_retry_after_is_accurate(redis_server: RedisServer) -> None:
    async def run() -> None:
        async with replicas(redis_server.url, Limits(requests_per_minute=60, request_burst=2),
                            key_prefix=unique_prefix(), timeout_s=1.0) as limiters:
            await limiters[0].admit(principal(), 1)
            await limiters[1].admit(principal(), 1)
            with pytest.raises(RateLimitExceeded) as denied:
                await limiters[2].admit(principal(), 1)
            retry = denied.value.retry_after_s
            assert 0.8 < retry <= 1.0
            await asyncio.sleep(retry / 2)
            with pytest.raises(RateLimitExceeded) as again:
                await limiters[3].admit(principal(), 1)
            assert again.value.retry_after_s < retry - 0.3
            await asyncio.sleep(again.value.retry_after_s + 0.02)
            admission = await limiters[3].admit(principal(), 1)
            assert admission.headers["x-ratelimit-remaining-requests"] == "0"

    asyncio.run(run())


# -- reservations and refunds ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["local", "redis"])
def test_settle_refunds_the_unused_tokens_once(kind: str, redis_server: RedisServer) -> None:
    async def run() -> None:
        clock = FakeClock()
        # 1/16 s a token, exact in binary: the boundary cases below land exactly on the burst.
        limits = Limits(tokens_per_minute=960, token_burst=100)
        async with limiter_of(kind, redis_server.url, limits, clock) as limiter:
            first = await limiter.admit(principal(), 80)
            assert first.reserved_tokens == 80
            assert not (await outcome(limiter, principal(), 80))[0]  # 20 left
            await limiter.settle(first, 30)  # 50 come back: 70 left
            assert first.settled
            second = await limiter.admit(principal(), 60)  # 10 left
            await limiter.settle(first, 0)  # already settled: nothing more comes back
            assert not (await outcome(limiter, principal(), 20))[0]
            await limiter.settle(second, 60)  # used all it reserved: nothing to give back
            assert (await outcome(limiter, principal(), 10))[0]

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_settle_on_abort(kind: str, redis_server: RedisServer) -> None:
    """A request cancelled mid-generation (client gone) settles in its finally, and the refund lands."""
    async def run() -> None:
        clock = FakeClock()
        limits = Limits(tokens_per_minute=960, token_burst=100)
        async with limiter_of(kind, redis_server.url, limits, clock) as limiter:
            started = asyncio.Event()

            async def request() -> None:
                admission = await limiter.admit(principal(), 100)
                used = 0
                try:
                    started.set()
                    await asyncio.sleep(60)  # generating
                    used = 100
                finally:
                    await limiter.settle(admission, used)

            task = asyncio.create_task(request())
            await started.wait()
            assert not (await outcome(limiter, principal(), 1))[0]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await outcome(limiter, principal(), 100))[0]

    asyncio.run(run())


# -- Redis down or slow -----------------------------------------------------------------

def breaker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "loomserve.gateway.circuit_breaker" and r.levelno == logging.WARNING
            and "unavailable" in r.getMessage()]


def test_fail_open_when_redis_is_down(own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loomserve.gateway.circuit_breaker")
    backoff = 0.3

    async def run() -> None:
        async with redis_limiter(own_redis.url, Limits(requests_per_minute=60, tokens_per_minute=6000),
                                 key_prefix=unique_prefix(), base_backoff_s=backoff, max_backoff_s=backoff,
                                 timeout_s=0.5) as limiter:
            reserved = await limiter.admit(principal(), 100)
            assert reserved.checked and reserved.reserved_tokens == 100
            own_redis.stop()
            calls_before = limiter.stats.store_calls
            start = time.monotonic()
            decisions: list[Admission] = []
            while time.monotonic() - start < 1.0:
                decisions.append(await limiter.admit(principal(), 100))
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - start
            assert len(decisions) > 30
            assert all(not d.checked and d.reserved_tokens == 0 and d.headers == {} for d in decisions)
            assert limiter.stats.admitted_unchecked == len(decisions)
            attempts = limiter.stats.store_calls - calls_before
            assert 1 <= attempts <= 1 + math.ceil(elapsed / backoff)
            assert limiter.stats.store_failures == attempts
            assert len(breaker_warnings(caplog)) == attempts  # one line per back-off, not per request

            await limiter.settle(reserved, 0)  # the refund is lost, quietly
            assert limiter.stats.refunds_lost == 1
            for d in decisions[:3]:
                await limiter.settle(d, 0)  # nothing was reserved: nothing to do

            own_redis.start()  # empty, and without the script: EVALSHA must reload it
            await asyncio.sleep(backoff + 0.05)
            assert (await limiter.admit(principal(), 100)).checked

    asyncio.run(run())


def test_fail_closed_per_limit(own_redis: RedisServer) -> None:
    async def run() -> None:
        async with redis_limiter(own_redis.url, Limits(requests_per_minute=60, tokens_per_minute=6000),
                                 key_prefix=unique_prefix(), requests_on_failure="closed",
                                 tokens_on_failure="open", base_backoff_s=0.3, timeout_s=0.5) as limiter:
            await limiter.admit(principal(), 10)
            own_redis.stop()
            for _ in range(20):
                with pytest.raises(APIError) as refused:
                    await limiter.admit(principal(), 10)
                e = refused.value
                assert e.status == 503 and e.code == "rate_limiter_unavailable"
                assert int(e.headers["retry-after"]) >= 1
                assert "requests limits" in e.message
            assert limiter.stats.rejected_unavailable == 20
            assert limiter.stats.store_calls <= 2
            # A key whose tenant has only a tokens limit (which fails open) is admitted unchecked.
            async with redis_limiter(own_redis.url, Limits(tokens_per_minute=6000), key_prefix=unique_prefix(),
                                     requests_on_failure="closed", tokens_on_failure="open") as tokens_only:
                assert not (await tokens_only.admit(principal(), 10)).checked

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_slow_redis_times_out(mode: FailMode, own_redis: RedisServer) -> None:
    async def run() -> None:
        async with redis_limiter(own_redis.url, Limits(requests_per_minute=60), key_prefix=unique_prefix(),
                                 requests_on_failure=mode, timeout_s=0.05) as limiter:
            # Connect and load the script first; on a busy machine that alone may take over 50 ms.
            for _ in range(10):
                with contextlib.suppress(APIError):
                    if (await limiter.admit(principal(), 1)).checked:
                        break
                await asyncio.sleep(0.55)
            calls_before = limiter.stats.store_calls
            own_redis.pause(1.5)
            start = time.monotonic()
            results: list[bool | int] = []
            for _ in range(10):
                try:
                    results.append((await limiter.admit(principal(), 1)).checked)
                except APIError as e:
                    results.append(e.status)
            assert time.monotonic() - start < 0.5  # one timeout, then the breaker answers at once
            assert results == ([False] * 10 if mode == "open" else [503] * 10)
            assert limiter.stats.store_calls - calls_before == 1

    asyncio.run(run())


def test_redis_server_helper_restarts_on_the_same_port(own_redis: RedisServer) -> None:
    client = redis.Redis.from_url(own_redis.url)
    client.set("k", "v")
    own_redis.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    own_redis.start()
    assert client.ping() and client.get("k") is None
    client.close()


def test_prepare_connects_and_loads_the_script(own_redis: RedisServer) -> None:
    """At start-up, so that the first request's short timeout covers one round trip."""
    sha = hashlib.sha1(GCRA_LUA.encode()).hexdigest()
    probe = redis.Redis.from_url(own_redis.url)
    assert probe.script_exists(sha) == [False]

    async def run() -> None:
        async with redis_limiter(own_redis.url, Limits(requests_per_minute=60),
                                 key_prefix=unique_prefix()) as limiter:
            await limiter.prepare()
            assert probe.script_exists(sha) == [True]
            assert (await limiter.admit(principal(), 1)).checked
            assert limiter.stats.store_failures == 0

    asyncio.run(run())
    probe.close()


def test_prepare_without_redis_only_logs(own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loomserve.gateway.ratelimit")
    own_redis.stop()

    async def run() -> None:
        async with redis_limiter(own_redis.url, Limits(requests_per_minute=60), key_prefix=unique_prefix(),
                                 requests_on_failure="closed") as limiter:
            await limiter.prepare(timeout_s=1.0)
            assert any("not ready at start-up" in r.getMessage() and "requests fail closed" in r.getMessage()
                       for r in caplog.records)
            with pytest.raises(APIError):  # then each request meets its failure policy, as always
                await limiter.admit(principal(), 1)

    asyncio.run(run())


def test_gateway_builds_its_limiter_from_the_config(redis_server: RedisServer) -> None:
    """--rate-limit-timeout-ms reaches the Redis limiter; without Redis the limits live in memory."""
    redis_url = redis_server.url

    async def run() -> None:
        async with redis_client(redis_url) as shared:
            limiter = build_limiter(GatewayConfig(redis_url=redis_url, rate_limit_rpm=5, rate_limit_timeout_ms=250,
                                                  rate_limit_tokens_on_failure="closed"), shared)
            assert isinstance(limiter, RedisRateLimiter)
            assert limiter.timeout_s == 0.25 and limiter.on_failure == {"requests": "open", "tokens": "closed"}
            assert limiter.default_limits.requests_per_minute == 5
            await limiter.aclose()
            assert isinstance(build_limiter(GatewayConfig(rate_limit_rpm=5), None), LocalRateLimiter)
            with pytest.raises(ValueError, match="must be positive, got 0 ms"):
                build_limiter(GatewayConfig(redis_url=redis_url, rate_limit_timeout_ms=0), shared)

    asyncio.run(run())
