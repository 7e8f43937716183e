"""What the gateway talks to besides the engine: one Redis client, the rate limiter
and the response cache, opened when the gateway starts.

With ``--redis-url`` the gateway opens one Redis client (one connection pool) inside
its event loop (redis.asyncio binds a connection to the loop that opens it) and hands
it to its three users. Each bounds its own calls:

| user                               | each call within        | when Redis is down or slower                  |
|------------------------------------|-------------------------|-----------------------------------------------|
| API keys (``auth.RedisKeySource``) | 250 ms                  | 503 ``auth_unavailable``; a breaker backs off |
| rate limits (``RedisRateLimiter``) | --rate-limit-timeout-ms | admit unchecked or 503, per limit; a breaker  |
|                                    | (5 s for ``prepare``)   | backs off                                     |
| response cache (``ResponseCache``) | 250 ms                  | a miss, or not stored; Redis left alone 1 s   |

So the client has no socket timeouts and no retries of its own: each budget above is
an ``asyncio.timeout`` around the call, connecting included, and one user's budget
never becomes another's. A call cut short closes its connection (redis-py disconnects
on a cancelled read), so a late reply never reaches the next user of the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loomserve.gateway.auth import KeyStore
from loomserve.gateway.limits import Limits
from loomserve.gateway.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from loomserve.gateway.response_cache import ResponseCache
from loomserve.shared.config import GatewayConfig

log = logging.getLogger(__name__)


def describe_redis_url(url: str) -> str:
    """The URL without credentials (user info or query options), for logs."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def open_redis(url: str) -> aioredis.Redis:
    """The gateway's one Redis client; open it inside the event loop that will use it."""
    log.info("Redis at %s, shared by API keys, rate limits and the response cache",
             describe_redis_url(url))
    # No retries: each user decides what a failure means (a breaker, a miss), and a retry
    # would only spend the time its caller is waiting for.
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))


def build_limiter(config: GatewayConfig, redis: aioredis.Redis | None) -> RateLimiter:
    """The gateway's rate limiter: in Redis (shared by replicas) when there is a client,
    else in this process's memory."""
    c = config
    defaults = Limits(c.rate_limit_rpm, c.rate_limit_tpm, c.rate_limit_request_burst, c.rate_limit_token_burst)
    if redis is None:
        return LocalRateLimiter(defaults)
    return RedisRateLimiter(
        redis, defaults,
        requests_on_failure=c.rate_limit_requests_on_failure,  # type: ignore[arg-type]
        tokens_on_failure=c.rate_limit_tokens_on_failure,  # type: ignore[arg-type]
        timeout_s=c.rate_limit_timeout_ms / 1000.0)


@dataclass
class Services:
    """The services of one gateway; ``redis`` None when it has no ``--redis-url``."""

    redis: aioredis.Redis | None
    limiter: RateLimiter
    cache: ResponseCache | None

    async def aclose(self) -> None:
        await self.limiter.aclose()  # refunds still on their way use the client
        if self.redis is not None:
            await self.redis.aclose()


async def open_services(config: GatewayConfig, keys: KeyStore, on_cache_error: Callable[[str], None]) -> Services:
    """Opens the Redis client (with ``config.redis_url``) and hands it to ``keys`` (when they
    are looked up in Redis), the rate limiter and the response cache."""
    redis = open_redis(config.redis_url) if config.redis_url else None
    if keys.redis_keys:
        if redis is None:
            raise ValueError("--redis-keys needs --redis-url")
        keys.connect_redis(redis)
    limiter = build_limiter(config, redis)
    if isinstance(limiter, RedisRateLimiter):
        await limiter.prepare()
    cache = None
    if config.response_cache:
        cache = ResponseCache(redis, ttl_s=config.response_cache_ttl_s,
                              max_entry_bytes=config.response_cache_max_entry_bytes, on_error=on_cache_error)
    return Services(redis, limiter, cache)
