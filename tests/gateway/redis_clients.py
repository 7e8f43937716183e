"""The gateway's Redis client for tests, opened inside the test's event loop and closed on exit.

Tests hand it to the classes that take the gateway's shared client (RedisKeySource,
RedisRateLimiter, ResponseCache), as gateway/services.py does at start-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from loomserve.gateway.services import open_redis


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = open_redis(url)
    try:
        yield client
    finally:
        await client.aclose()
