"""A cache of whole answers to deterministic requests, in Redis or in process.

A request is cacheable when its answer is reproducible: temperature 0 (greedy; sent,
or the server's default for a request that sends none), or a seed (each seeded request
samples from its own generator). The key is a SHA-256 over a canonical JSON encoding of
the tenant, the model, its revision, the server's sampling defaults for omitted fields,
the endpoint and the whole request body except a short denylist of fields that
only change how the answer is delivered. A denylist rather than an allowlist:
a field this module does not know (a new sampling parameter, an extension) then
splits the key instead of silently sharing an entry between requests whose
answers differ. The price of an unknown harmless field is a miss, never a
wrong answer.

The tenant comes from the server-side identity, so two tenants sending the same
body get different keys and never see each other's entries.

An entry (``CachedResponse``) keeps each choice as the pieces the client saw,
with their token ids and API-shaped logprobs, plus the usage; that is enough
to answer again as one JSON body or as an SSE stream, whichever the new request
asks for (``stream`` is not part of the key; gateway/rendering.py replays).

Redis is an optimisation, never a dependency: a failed read is a miss, a failed
write is logged (at most once per interval) and counted, and after a failure
Redis is left alone for ``retry_after_s`` so that an outage does not add a
timeout to every request. Without Redis, entries live in a per-process LRU
bounded by entry count and bytes (valid for a single gateway replica).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

# Marks a response served from the cache, so clients and tests can tell.
CACHE_HEADER = "x-loomserve-cache"
CACHE_HIT = "hit"

# Bumped when the key derivation or the entry format changes, so old entries are never read.
_KEY_VERSION = 2
DEFAULT_KEY_PREFIX = f"loomserve:response:v{_KEY_VERSION}:"

# Fields that change how an answer is delivered, never which tokens it holds:
# - stream: the same tokens are sent as one JSON body or as SSE chunks; the entry replays either way.
# - stream_options: only frames the stream (include_usage adds a usage chunk, which is rebuilt from the
#   usage stored in the entry; obfuscation padding carries no content).
# - user: an end-user id for the caller's own abuse tracking; generation never reads it, and tenant
#   isolation comes from the server-side tenant, not from this client-supplied string.
DELIVERY_ONLY_FIELDS = frozenset({"stream", "stream_options", "user"})

# Only answers that ended normally are worth replaying; "abort" and "error" describe one unlucky run.
_CACHEABLE_FINISH_REASONS = frozenset({"stop", "length"})

Kind = Literal["completion", "chat"]


# -- keys ---------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_cacheable(body: Mapping[str, Any], default_temperature: float) -> bool:
    """Whether the answer to ``body`` is reproducible, so that replaying it is correct;
    ``default_temperature`` is what the server samples at when the body sends none."""
    seed = body.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
        return False
    seeded = seed is not None
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not (isinstance(n, int) and not isinstance(n, bool)):
        return False
    # n > 1 asks for several samples; only a seed (one per choice) makes that set reproducible.
    if n > 1 and not seeded:
        return False
    temperature = body.get("temperature")
    if temperature is None:
        temperature = default_temperature
    if not _is_number(temperature) or not math.isfinite(temperature):
        return False
    return temperature == 0 or seeded


class _NotCanonical(Exception):
    """A value with no canonical JSON form (NaN or infinity)."""


def _canonical(value: Any) -> Any:
    """``value`` with every number in one spelling: an integral float becomes an int, so 0,
    0.0 and -0.0 (and 1 and 1.0) encode the same; other floats keep Python's shortest repr."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotCanonical
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"request body keys must be strings, got {type(k).__name__}")
            out[k] = _canonical(v)
        return out
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    raise TypeError(f"a decoded JSON body holds no {type(value).__name__}; pass the body as parsed JSON")


def cache_key(tenant: str, model: str, revision: str, endpoint: str, body: Mapping[str, Any],
              sampling_defaults: Mapping[str, float]) -> str | None:
    """The cache key of a request, or None when its answer must not be cached.

    ``body`` is the request body as parsed JSON. ``revision`` identifies the weights
    (a new revision must not replay answers of the old one); ``sampling_defaults`` are the
    values the server fills in for sampling fields the body leaves out (a server started
    with others must not replay these answers). Raises TypeError when ``body`` holds values
    that parsed JSON cannot (a programming error, not a client one).
    """
    if not isinstance(body, Mapping) or not is_cacheable(body, sampling_defaults["temperature"]):
        return None
    content = {k: v for k, v in body.items() if k not in DELIVERY_ONLY_FIELDS}
    try:
        material = _canonical({
            "v": _KEY_VERSION,
            "tenant": tenant,
            "model": model,
            "revision": revision,
            "endpoint": endpoint,
            "sampling_defaults": dict(sampling_defaults),
            "body": content,
        })
    except _NotCanonical:
        return None
    # ASCII escapes: every string encodes, lone surrogates from a "\ud800" escape included.
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()


# -- entries ------------------------------------------------------------------


class CachedPiece(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One piece of a choice as it was sent: its text, its token ids, and the API-shaped
    ``logprobs`` object of those tokens (None when the request asked for none)."""

    text: str
    token_ids: list[int] = []
    logprobs: dict[str, Any] | None = None


class CachedChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pieces: list[CachedPiece]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def token_ids(self) -> list[int]:
        return [t for p in self.pieces for t in p.token_ids]


class CachedResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything needed to answer again, as JSON or SSE. Choice ``i`` has index ``i``."""

    kind: Kind
    choices: list[CachedChoice]
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def replayable(self) -> bool:
        """Only answers whose every choice ended with stop or length are stored."""
        return bool(self.choices) and all(c.finish_reason in _CACHEABLE_FINISH_REASONS for c in self.choices)


class ResponseRecorder:
    """Collects what the gateway sends, piece by piece, into a ``CachedResponse``.

    Call ``add`` for every piece of every choice as it goes out (a non-streamed choice is
    one piece), then ``result`` with the usage once every choice has finished.
    """

    def __init__(self, kind: Kind, num_choices: int) -> None:
        self.kind = kind
        self._pieces: list[list[CachedPiece]] = [[] for _ in range(num_choices)]
        self._finish: list[str | None] = [None] * num_choices

    def add(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
            finish_reason: str | None = None) -> None:
        self._pieces[index].append(CachedPiece(text, list(token_ids), logprobs))
        if finish_reason is not None:
            self._finish[index] = finish_reason

    def result(self, prompt_tokens: int, completion_tokens: int) -> CachedResponse | None:
        """The entry, or None while some choice has not finished."""
        if any(f is None for f in self._finish):
            return None
        choices = [CachedChoice(p, f) for p, f in zip(self._pieces, self._finish, strict=True) if f is not None]
        return CachedResponse(self.kind, choices, prompt_tokens, completion_tokens)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CachedResponse)


def encode_entry(response: CachedResponse) -> bytes:
    return _encoder.encode(response)


def decode_entry(data: bytes) -> CachedResponse:
    """Raises ``msgspec.DecodeError`` (or its subclass ``ValidationError``) on a damaged entry."""
    return _decoder.decode(data)


# -- storage ------------------------------------------------------------------


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    too_large: int = 0
    not_replayable: int = 0
    get_errors: int = 0
    put_errors: int = 0


class _LogLimiter:
    """Logs a repeated warning at most once per interval, saying how many were held back."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            self._suppressed += 1
            return
        if self._suppressed:
            log.warning(message + " (%d similar warnings suppressed)", *args, self._suppressed)
        else:
            log.warning(message, *args)
        self._last = now
        self._suppressed = 0


class LRUStore:
    """Encoded entries in process, least recently used out first, bounded by count and bytes."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires at, data)
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _remove(self, key: str) -> None:
        _, data = self._entries.pop(key)
        self.nbytes -= len(data)

    def get(self, key: str) -> bytes | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires_at, data = item
        if self._clock() >= expires_at:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return data

    def put(self, key: str, data: bytes, ttl_s: float) -> bool:
        if len(data) > self.max_bytes:
            return False
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (self._clock() + ttl_s, data)
        self.nbytes += len(data)
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
        return True


class ResponseCache:
    """Stores and fetches ``CachedResponse`` entries by ``cache_key``.

    ``redis`` is the gateway's shared client (see gateway/services.py), or None to keep
    entries in process; each Redis call gets ``redis_timeout_s``, connecting included.
    ``ttl_s`` is the default lifetime of an entry; entries whose encoding exceeds
    ``max_entry_bytes`` are not stored. ``on_error`` is called with "get" or "put" after
    each Redis failure (for a metric).
    """

    def __init__(
        self,
        redis: aioredis.Redis | None = None,
        *,
        ttl_s: float = 3600.0,
        max_entry_bytes: int = 1 << 20,
        max_entries: int = 4096,
        max_bytes: int = 64 << 20,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        redis_timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_entry_bytes <= 0 or max_entries <= 0 or max_bytes <= 0:
            raise ValueError("max_entry_bytes, max_entries and max_bytes must be positive")
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.key_prefix = key_prefix
        self.stats = CacheStats()
        self._redis_timeout_s = redis_timeout_s
        self._retry_after_s = retry_after_s
        self._on_error = on_error
        self._clock = clock
        self._errors_log = _LogLimiter(10.0, clock)
        self._redis_down_until = 0.0
        self._memory: LRUStore | None = None
        self._redis = redis
        if redis is None:
            self._memory = LRUStore(max_entries, max_bytes, clock)
            log.info("response cache in process (at most %d entries, %d MiB; valid for one gateway replica)",
                     max_entries, max_bytes >> 20)
        else:
            log.info("response cache in Redis (shared by every gateway replica)")

    @property
    def backend(self) -> str:
        return "memory" if self._memory is not None else "redis"

    def _redis_failed(self, op: str, error: Exception) -> None:
        self._redis_down_until = self._clock() + self._retry_after_s
        if op == "get":
            self.stats.get_errors += 1
        else:
            self.stats.put_errors += 1
        if self._on_error is not None:
            self._on_error(op)
        self._errors_log.warning("response cache: Redis %s failed (%s: %s); serving without the cache",
                                 op, type(error).__name__, error)

    def _redis_usable(self) -> bool:
        return self._clock() >= self._redis_down_until

    async def get(self, key: str) -> CachedResponse | None:
        """The entry under ``key``, or None (a miss, also when Redis fails)."""
        data: bytes | None = None
        if self._memory is not None:
            data = self._memory.get(key)
        elif self._redis is not None and self._redis_usable():
            try:
                async with asyncio.timeout(self._redis_timeout_s):
                    # The shared client does not decode: values come back as bytes.
                    data = cast(bytes | None, await self._redis.get(self.key_prefix + key))
            # Any failure of the cache, whatever its type, must leave the request to the engine.
            except Exception as e:
                self._redis_failed("get", e)
        if data is None:
            self.stats.misses += 1
            return None
        try:
            entry = decode_entry(data)
        except msgspec.DecodeError as e:
            self.stats.misses += 1
            self._errors_log.warning("response cache: dropped an undecodable entry (%d bytes): %s", len(data), e)
            return None
        self.stats.hits += 1
        return entry

    async def put(self, key: str, response: CachedResponse, ttl_s: float | None = None) -> bool:
        """Stores ``response`` for ``ttl_s`` seconds (default: the cache's TTL).

        Returns whether it was stored: answers that did not end with stop or length,
        entries over ``max_entry_bytes`` and Redis failures are not.
        """
        if not response.replayable():
            self.stats.not_replayable += 1
            return False
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl}")
        data = encode_entry(response)
        if len(data) > self.max_entry_bytes:
            self.stats.too_large += 1
            return False
        if self._memory is not None:
            stored = self._memory.put(key, data, ttl)
        elif self._redis is not None and self._redis_usable():
            try:
                async with asyncio.timeout(self._redis_timeout_s):
                    # Milliseconds, so a sub-second TTL is not rounded to nothing or to a whole second.
                    stored = bool(await self._redis.set(self.key_prefix + key, data, px=max(1, round(ttl * 1000))))
            except Exception as e:  # as in get: the cache never fails the request
                self._redis_failed("put", e)
                stored = False
        else:
            stored = False
        if stored:
            self.stats.stores += 1
        return stored
