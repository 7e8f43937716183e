"""Requests and tokens per minute, per tenant and per key, shared by every gateway replica.

Each limit is a GCRA bucket: one stored number, the theoretical arrival time
(TAT), the moment the bucket would be back to its full burst if nothing else arrived.

    interval  = 60 s / limit                  (time one unit "costs")
    tolerance = burst * interval              (how far ahead of now the TAT may run)
    take q:   new_tat = max(tat, now) + q * interval
              allowed iff new_tat - tolerance <= now; otherwise retry after new_tat - tolerance - now
    refund q: tat = max(tat - q * interval, now)

So ``burst`` units pass at once from idle, then one per interval: in any window
of a minute at most ``burst + limit`` units pass. A quantity above ``burst``
can never pass, and is refused with a 400 naming the numbers rather than a
Retry-After that would never come true.

A request takes 1 from each requests bucket and prompt + max_tokens from each
tokens bucket at admission (every bucket or none), and gives back the unused
tokens when it ends, so a stream cannot overshoot its tokens limit.

``RedisRateLimiter`` runs the algorithm as one Lua script with the clock from
Redis ``TIME``, so replicas agree on both the state and the time (Redis 5 or
later: scripts replicate their effects, so reading TIME before a write is safe).
``LocalRateLimiter`` keeps the buckets in this process, for one replica.

When Redis is down or slower than ``timeout_s`` each limit follows its policy:
``"open"`` admits unchecked (counted in ``stats``), ``"closed"`` answers 503
with Retry-After. A circuit breaker then leaves Redis alone for a back-off
(doubling, capped) and logs once per back-off, so an outage costs one timeout
per back-off, not one per request. ``prepare`` (the gateway calls it at start-up)
connects and loads the script with a longer timeout, so that the first request's
``timeout_s`` covers one round trip, not a connection and a script upload too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from loomserve.gateway.auth import Principal
from loomserve.gateway.circuit_breaker import CircuitBreaker
from loomserve.gateway.limits import Limits
from loomserve.gateway.protocol import APIError

log = logging.getLogger(__name__)

PERIOD_S = 60.0
DEFAULT_KEY_PREFIX = "loomserve:rl:"
# How long ``RedisRateLimiter.prepare`` waits for Redis at start-up.
PREPARE_TIMEOUT_S = 5.0

Dimension = Literal["requests", "tokens"]
FailMode = Literal["open", "closed"]


@dataclass(frozen=True)
class Bucket:
    key: str
    dimension: Dimension
    owner: str  # who the limit belongs to, for messages: "tenant 'acme'"
    limit: int  # per minute
    burst: int

    @property
    def interval_s(self) -> float:
        return PERIOD_S / self.limit

    @property
    def tolerance_s(self) -> float:
        return self.burst * self.interval_s


@dataclass(frozen=True)
class BucketState:
    allowed: bool
    retry_after_s: float  # 0 when allowed
    remaining: int  # units that would pass right now, after this take if it happened
    reset_after_s: float  # until the bucket is back to full burst


def _remaining(tolerance: float, ahead: float, interval: float) -> int:
    # The epsilon keeps an exact quotient such as 2.9999999999 from flooring to 2.
    return max(0, math.floor((tolerance - ahead) / interval + 1e-9))


def gcra_take(tat: float | None, now: float, interval: float, tolerance: float,
              quantity: int) -> tuple[BucketState, float]:
    """One GCRA decision; returns the state and the TAT to store if every bucket allows."""
    start = now if tat is None or tat < now else tat
    new_tat = start + quantity * interval
    wait = new_tat - tolerance - now
    if wait > 0:
        return BucketState(False, wait, _remaining(tolerance, start - now, interval), start - now), start
    return BucketState(True, 0.0, _remaining(tolerance, new_tat - now, interval), new_tat - now), new_tat


def gcra_refund(tat: float | None, now: float, interval: float, quantity: int) -> float:
    """The TAT after giving ``quantity`` back; never before now (a bucket holds at most its burst)."""
    start = now if tat is None else tat
    return max(start - quantity * interval, now)


# Times are microseconds: Redis TIME's unit, exact in a double until the year 2255.
# Replies are integers (Redis truncates Lua numbers), so times are rounded up.
GCRA_LUA = """
-- KEYS[i]: one bucket each. ARGV[1]: "take" or "refund". ARGV[2]: now in microseconds,
-- or "" to read it from TIME (only tests pass a time). ARGV[3i], ARGV[3i+1], ARGV[3i+2]:
-- emission interval, tolerance (microseconds) and quantity of KEYS[i].
-- take: reply {all_allowed, then per bucket: allowed, retry_after, remaining, reset_after},
-- written only if every bucket allows; remaining and reset_after describe the buckets as
-- they are after the call (taken from if all allowed, untouched if not). refund: reply {1}.
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[2])
end
local take = ARGV[1] == 'take'
local tats, waits = {}, {}
local all_allowed = 1
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i])
  local quantity = tonumber(ARGV[3 * i + 2])
  local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or now), now)
  if take then
    waits[i] = tat + quantity * interval - tonumber(ARGV[3 * i + 1]) - now
    if waits[i] > 0 then all_allowed = 0 end
    tats[i] = tat
  else
    tats[i] = math.max(tat - quantity * interval, now)
  end
end
if take and all_allowed == 1 then
  for i = 1, #KEYS do tats[i] = tats[i] + tonumber(ARGV[3 * i + 2]) * tonumber(ARGV[3 * i]) end
end
if not take or all_allowed == 1 then
  for i = 1, #KEYS do
    if tats[i] > now then
      -- %.17g round-trips a double; the key expires when the bucket is full again.
      redis.call('SET', KEYS[i], string.format('%.17g', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000))
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
if not take then return {1} end
local reply = {all_allowed}
for i = 1, #KEYS do
  local interval, tolerance = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  table.insert(reply, waits[i] > 0 and 0 or 1)
  table.insert(reply, math.ceil(math.max(waits[i], 0)))
  table.insert(reply, math.max(0, math.floor((tolerance - (tats[i] - now)) / interval + 1e-9)))
  table.insert(reply, math.ceil(tats[i] - now))
end
return reply
"""


def format_duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: "20ms", "1.5s", "6m0s"."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimitExceeded(APIError):
    """429 with Retry-After (whole seconds, rounded up) and the x-ratelimit-* headers."""

    def __init__(self, bucket: Bucket, requested: int, retry_after_s: float, headers: dict[str, str]) -> None:
        self.dimension = bucket.dimension
        self.retry_after_s = retry_after_s
        per = "requests per minute" if bucket.dimension == "requests" else "tokens per minute"
        super().__init__(
            429,
            f"rate limit reached for {bucket.owner} on {per}: limit {bucket.limit}, burst {bucket.burst}, "
            f"requested {requested}; try again in {format_duration(retry_after_s)}",
            type=bucket.dimension, code="rate_limit_exceeded",
            headers={**headers, "retry-after": str(max(1, math.ceil(retry_after_s))),
                     "retry-after-ms": str(math.ceil(retry_after_s * 1000))},
        )


class StoreUnavailable(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the rate-limit store is unavailable; retry in {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


@dataclass
class LimiterStats:
    """Counters for metrics: what the limiter decided without its store."""

    store_calls: int = 0
    store_failures: int = 0
    admitted_unchecked: int = 0  # fail open
    rejected_unavailable: int = 0  # fail closed
    refunds_lost: int = 0


@dataclass(eq=False)
class Admission:
    """A granted reservation; pass it to ``settle`` exactly when the request ends."""

    reserved_tokens: int
    headers: dict[str, str]  # x-ratelimit-* for the response
    checked: bool = True  # False when admitted without a check (store unavailable, fail open)
    token_buckets: tuple[Bucket, ...] = ()
    settled: bool = False


class RateLimiter(ABC):
    """Admission and settlement over GCRA buckets; subclasses keep the buckets somewhere."""

    def __init__(self, default_limits: Limits, *, requests_on_failure: FailMode = "open",
                 tokens_on_failure: FailMode = "open", key_prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.default_limits = default_limits
        self.on_failure: dict[Dimension, FailMode] = {"requests": requests_on_failure,
                                                      "tokens": tokens_on_failure}
        self.key_prefix = key_prefix
        self.stats = LimiterStats()
        self._refunds: set[asyncio.Task[None]] = set()

    def buckets(self, principal: Principal) -> list[Bucket]:
        """The tenant's buckets, then the key's own when the key sets limits."""
        # The tenant in braces is a Redis Cluster hash tag: one script's keys share a slot.
        base = f"{self.key_prefix}{{{principal.tenant}}}:"
        out = self._limit_buckets(self.default_limits, f"{base}tenant:", f"tenant {principal.tenant!r}")
        if principal.limits is not None:
            out += self._limit_buckets(principal.limits, f"{base}key:{principal.key_digest_prefix}:",
                                       f"key {principal.key_name!r} of tenant {principal.tenant!r}")
        return out

    @staticmethod
    def _limit_buckets(limits: Limits, key: str, owner: str) -> list[Bucket]:
        out = []
        if limits.requests_per_minute is not None:
            out.append(Bucket(key + "requests", "requests", owner, limits.requests_per_minute,
                              limits.request_burst or limits.requests_per_minute))
        if limits.tokens_per_minute is not None:
            out.append(Bucket(key + "tokens", "tokens", owner, limits.tokens_per_minute,
                              limits.token_burst or limits.tokens_per_minute))
        return out

    async def admit(self, principal: Principal, tokens: int) -> Admission:
        """Charge 1 request and ``tokens`` (prompt + max_tokens) to every bucket of the principal.

        Raises APIError: 400 if ``tokens`` exceeds a tokens burst (it could never pass),
        429 (RateLimitExceeded) when a bucket is empty, 503 when the store is unavailable
        and a limit in play fails closed.
        """
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, got {tokens}")
        buckets = self.buckets(principal)
        if not buckets:
            return Admission(0, {})
        quantities = [1 if b.dimension == "requests" else tokens for b in buckets]
        for b in buckets:
            if b.dimension == "tokens" and tokens > b.burst:
                raise APIError(400, f"this request needs {tokens} tokens (prompt + max_tokens), more than the "
                                    f"burst of {b.burst} tokens allowed to {b.owner} (limit {b.limit} tokens "
                                    f"per minute), so it can never be admitted; lower max_tokens or shorten "
                                    f"the prompt", param="max_tokens", code="tokens_exceed_rate_limit")
        try:
            states = await self._take(buckets, quantities)
        except StoreUnavailable as e:
            return self._without_store(principal, buckets, e)
        headers = _headers(buckets, states)
        denied = [(b, q, s) for b, q, s in zip(buckets, quantities, states, strict=True) if not s.allowed]
        if denied:
            bucket, quantity, state = max(denied, key=lambda d: d[2].retry_after_s)
            raise RateLimitExceeded(bucket, quantity, state.retry_after_s, headers)
        token_buckets = tuple(b for b in buckets if b.dimension == "tokens")
        return Admission(tokens if token_buckets else 0, headers, token_buckets=token_buckets)

    def _without_store(self, principal: Principal, buckets: Sequence[Bucket], error: StoreUnavailable) -> Admission:
        closed = sorted({b.dimension for b in buckets if self.on_failure[b.dimension] == "closed"})
        if closed:
            self.stats.rejected_unavailable += 1
            raise APIError(503, f"{' and '.join(closed)} limits cannot be checked right now; retry shortly",
                           type="rate_limit_unavailable", code="rate_limiter_unavailable",
                           headers={"retry-after": str(max(1, math.ceil(error.retry_after_s)))})
        self.stats.admitted_unchecked += 1
        return Admission(0, {}, checked=False)

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        """Give back the reserved tokens the request did not use. Call once when it ends, abort
        and error included; later calls do nothing. Never raises (a lost refund is counted)."""
        if admission.settled:
            return
        admission.settled = True
        refund = admission.reserved_tokens - max(0, used_tokens)
        if refund <= 0 or not admission.token_buckets:
            return
        # Shielded: settle usually runs in the finally of a request being cancelled, and the
        # refund must still land.
        task = asyncio.ensure_future(self._refund(admission.token_buckets, refund))
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)
        await asyncio.shield(task)

    async def aclose(self) -> None:
        if self._refunds:
            await asyncio.gather(*self._refunds, return_exceptions=True)

    @abstractmethod
    async def _take(self, buckets: Sequence[Bucket], quantities: Sequence[int]) -> list[BucketState]:
        """Take from every bucket or from none; raise StoreUnavailable if the store cannot say."""

    @abstractmethod
    async def _refund(self, buckets: Sequence[Bucket], quantity: int) -> None:
        """Give ``quantity`` back to each bucket; never raise."""


def _headers(buckets: Sequence[Bucket], states: Sequence[BucketState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, each dimension from its tightest bucket."""
    headers = {}
    for dimension in ("requests", "tokens"):
        pairs = [(b, s) for b, s in zip(buckets, states, strict=True) if b.dimension == dimension]
        if not pairs:
            continue
        bucket, state = min(pairs, key=lambda p: (p[1].remaining, -p[1].reset_after_s))
        headers[f"x-ratelimit-limit-{dimension}"] = str(bucket.limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{dimension}"] = format_duration(state.reset_after_s)
    return headers


class LocalRateLimiter(RateLimiter):
    """Buckets in this process: right for one gateway replica only."""

    def __init__(self, default_limits: Limits, *, key_prefix: str = DEFAULT_KEY_PREFIX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(default_limits, key_prefix=key_prefix)
        self.clock = clock
        # One float per tenant and key with limits; both sets are bounded by the configured keys.
        self._tats: dict[str, float] = {}
        log.info("rate limits are kept in this process: they hold for this gateway replica only; "
                 "configure a Redis URL to share them between replicas")

    async def _take(self, buckets: Sequence[Bucket], quantities: Sequence[int]) -> list[BucketState]:
        # No await between reading and writing: atomic on the event loop.
        now = self.clock()
        results = [gcra_take(self._tats.get(b.key), now, b.interval_s, b.tolerance_s, q)
                   for b, q in zip(buckets, quantities, strict=True)]
        if all(state.allowed for state, _ in results):
            for b, (_, tat) in zip(buckets, results, strict=True):
                self._tats[b.key] = tat
            return [state for state, _ in results]
        # Refused: the buckets that would have allowed report themselves untouched, as in the script.
        return [state if not state.allowed else gcra_take(self._tats.get(b.key), now, b.interval_s,
                                                          b.tolerance_s, 0)[0]
                for b, (state, _) in zip(buckets, results, strict=True)]

    async def _refund(self, buckets: Sequence[Bucket], quantity: int) -> None:
        now = self.clock()
        for b in buckets:
            self._tats[b.key] = gcra_refund(self._tats.get(b.key), now, b.interval_s, quantity)


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, shared by every replica, with the clock of the Redis server."""

    def __init__(self, redis: aioredis.Redis, default_limits: Limits, *,
                 requests_on_failure: FailMode = "open", tokens_on_failure: FailMode = "open",
                 timeout_s: float = 0.05, base_backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 key_prefix: str = DEFAULT_KEY_PREFIX, clock: Callable[[], float] | None = None) -> None:
        """``redis`` is the gateway's shared client (see gateway/services.py); each call gets
        ``timeout_s``, connecting included. ``clock`` (seconds) replaces Redis TIME, for tests
        only: replicas would disagree."""
        if not timeout_s > 0:
            raise ValueError(f"the rate-limit Redis timeout must be positive, got {timeout_s * 1000:g} ms")
        super().__init__(default_limits, requests_on_failure=requests_on_failure,
                         tokens_on_failure=tokens_on_failure, key_prefix=key_prefix)
        self.timeout_s = timeout_s
        self.clock = clock
        self._redis = redis
        self._script = redis.register_script(GCRA_LUA)
        self.breaker = CircuitBreaker(
            f"rate-limit Redis (requests fail {requests_on_failure}, tokens fail {tokens_on_failure})",
            base_backoff_s, max_backoff_s)

    async def prepare(self, timeout_s: float = PREPARE_TIMEOUT_S) -> None:
        """Open a connection and load the script. A Redis that cannot be reached now only
        logs: requests then meet the usual failure policy until it can."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._redis.script_load(GCRA_LUA)
        except (RedisError, OSError, TimeoutError) as e:
            log.warning("rate-limit Redis not ready at start-up (%s: %s); requests fail %s, tokens fail %s "
                        "until it is", type(e).__name__, e, self.on_failure["requests"], self.on_failure["tokens"])

    async def _eval(self, mode: str, buckets: Sequence[Bucket], args: list[str]) -> list[int]:
        if not self.breaker.allow():
            raise StoreUnavailable(self.breaker.retry_after_s())
        self.stats.store_calls += 1
        now = "" if self.clock is None else repr(self.clock() * 1e6)
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await self._script(keys=[b.key for b in buckets], args=[mode, now, *args])
        except (RedisError, OSError, TimeoutError) as e:
            self.stats.store_failures += 1
            self.breaker.record_failure(e)
            raise StoreUnavailable(self.breaker.retry_after_s()) from e
        except BaseException:
            self.breaker.record_abandoned()
            raise
        self.breaker.record_success()
        return [int(x) for x in reply]

    async def _take(self, buckets: Sequence[Bucket], quantities: Sequence[int]) -> list[BucketState]:
        args = []
        for b, q in zip(buckets, quantities, strict=True):
            args += [repr(b.interval_s * 1e6), repr(b.tolerance_s * 1e6), str(q)]
        reply = await self._eval("take", buckets, args)
        return [BucketState(allowed=reply[i] == 1, retry_after_s=reply[i + 1] / 1e6, remaining=reply[i + 2],
                            reset_after_s=reply[i + 3] / 1e6)
                for i in range(1, len(reply), 4)]

    async def _refund(self, buckets: Sequence[Bucket], quantity: int) -> None:
        args = []
        for b in buckets:
            args += [repr(b.interval_s * 1e6), "0", str(quantity)]
        try:
            await self._eval("refund", buckets, args)
        except StoreUnavailable:
            # The tenant stays charged for tokens it did not use until its TAT passes: safe side.
            self.stats.refunds_lost += 1

