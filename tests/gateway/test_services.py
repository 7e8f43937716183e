"""The gateway's services: one Redis client shared by API keys, rate limits and the response
cache, each keeping its own time budget, against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from loomserve.gateway.auth import KeyStore, KeyStoreUnavailable, Principal, generate_key
from loomserve.gateway.ratelimit import LocalRateLimiter, RedisRateLimiter
from loomserve.gateway.response_cache import CachedChoice, CachedPiece, CachedResponse
from loomserve.gateway.services import Services, open_redis, open_services
from loomserve.shared.config import GatewayConfig
from tests.redis_server import RedisServer

ENTRY = CachedResponse("completion", [CachedChoice([CachedPiece("hi", [5])], "stop")], 1, 1)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def config(url: str | None) -> GatewayConfig:
    return GatewayConfig(redis_url=url, redis_keys=url is not None, rate_limit_rpm=600, rate_limit_timeout_ms=50)


async def use_all_three(services: Services, keys: KeyStore, digest: str) -> None:
    principal = await keys.authenticate("lsk-unknown")
    assert principal is None
    assert keys.redis_source is not None
    record = await keys.redis_source.lookup(digest)
    assert record is not None and record.tenant == "initech"
    assert (await services.limiter.admit(record.principal(), 1)).checked
    assert services.cache is not None
    assert await services.cache.put("k", ENTRY)
    assert await services.cache.get("k") == ENTRY


def test_log_shows_no_redis_credentials(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="loomserve.gateway.services"):
        client = open_redis("redis://user:s3cret@cache.internal:6380/2?password=hunter2")
    asyncio.run(client.aclose())
    assert "redis://cache.internal:6380/2" in caplog.text
    assert "s3cret" not in caplog.text and "hunter2" not in caplog.text


def test_without_redis_everything_stays_in_process() -> None:
    async def run() -> None:
        services = await open_services(config(None), KeyStore(), lambda op: None)
        assert services.redis is None and isinstance(services.limiter, LocalRateLimiter)
        assert services.cache is not None and services.cache.backend == "memory"
        await services.aclose()

    asyncio.run(run())
    with pytest.raises(ValueError, match="--redis-keys needs --redis-url"):
        asyncio.run(open_services(config(None), KeyStore(redis_keys=True), lambda op: None))


def test_one_client_serves_keys_limits_and_cache(own_redis: RedisServer) -> None:
    probe = redis.Redis.from_url(own_redis.url)
    _, digest = generate_key()
    probe.hset(f"loomserve:keys:{digest}", mapping={"tenant": "initech"})

    async def run() -> None:
        keys = KeyStore(redis_keys=True)
        services = await open_services(config(own_redis.url), keys, lambda op: None)
        try:
            assert isinstance(services.limiter, RedisRateLimiter) and services.cache is not None
            assert services.cache.backend == "redis"
            await use_all_three(services, keys, digest)
            # One pool, used one call at a time: one connection (besides the probe's own).
            assert len(probe.client_list()) == 2
        finally:
            await services.aclose()
        assert len(probe.client_list()) == 1  # closed with the gateway

    asyncio.run(run())
    probe.close()


def test_each_user_keeps_its_own_timeout_and_the_client_recovers(own_redis: RedisServer) -> None:
    """A stalled Redis costs each user its own budget (keys 250 ms, rate limits 50 ms, cache
    250 ms), never another's; once Redis answers again the same client serves all three, and
    the replies to the calls that timed out reach no one (use_all_three would see them)."""
    probe = redis.Redis.from_url(own_redis.url)
    _, digest = generate_key()
    probe.hset(f"loomserve:keys:{digest}", mapping={"tenant": "initech"})
    cache_errors: list[str] = []

    async def run() -> None:
        keys = KeyStore(redis_keys=True)
        services = await open_services(config(own_redis.url), keys, cache_errors.append)
        try:
            assert keys.redis_source is not None and services.cache is not None
            await use_all_three(services, keys, digest)
            own_redis.pause(1.5)
            started = time.monotonic()
            with pytest.raises(KeyStoreUnavailable):
                await keys.redis_source.lookup(digest)
            keys_s, started = time.monotonic() - started, time.monotonic()
            admission = await services.limiter.admit(Principal("initech", "", "", None), 1)
            limits_s, started = time.monotonic() - started, time.monotonic()
            assert await services.cache.get("k") is None
            cache_s = time.monotonic() - started
            assert not admission.checked  # rate limits fail open, as configured
            assert cache_errors == ["get"]
            # asyncio.timeout never fires early; the upper bounds leave room for a loaded machine.
            assert 0.25 <= keys_s < 1.0 and 0.25 <= cache_s < 1.0
            assert 0.05 <= limits_s < 0.25
            await asyncio.sleep(1.6)  # the pause ends, and every back-off with it
            await use_all_three(services, keys, digest)
        finally:
            await services.aclose()

    asyncio.run(run())
    probe.close()
