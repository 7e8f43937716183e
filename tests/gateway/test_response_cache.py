"""The response cache: keys, Redis and in-process storage, failure handling, and replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis

from loomserve.gateway import response_cache as rc
from loomserve.gateway.rendering import ChatRenderer
from loomserve.gateway.response_cache import (
    CACHE_HEADER,
    CACHE_HIT,
    DELIVERY_ONLY_FIELDS,
    CachedChoice,
    CachedPiece,
    CachedResponse,
    LRUStore,
    ResponseCache,
    ResponseRecorder,
    cache_key,
    decode_entry,
    encode_entry,
    is_cacheable,
)
from loomserve.gateway.sampling_defaults import OPENAI_DEFAULTS
from tests.gateway.redis_clients import redis_client
from tests.redis_server import RedisServer, free_port

T = TypeVar("T")

REDIS_URL = "redis://127.0.0.1:6379/0"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def key(body: dict[str, Any], tenant: str = "acme", model: str = "smol", revision: str = "r1",
        endpoint: str = COMPLETIONS, defaults: dict[str, float] = OPENAI_DEFAULTS) -> str | None:
    return cache_key(tenant, model, revision, endpoint, body, defaults)


def answer(text: str = "Hello there", kind: rc.Kind = "completion", finish: str = "stop",
           pieces: int = 1, choices: int = 1) -> CachedResponse:
    """An answer whose text is split into ``pieces`` pieces, one token per character."""
    size = max(1, len(text) // pieces)
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    made = []
    for c in range(choices):
        made.append(CachedChoice([CachedPiece(p, [ord(ch) + c for ch in p]) for p in parts], finish))
    return CachedResponse(kind, made, prompt_tokens=5, completion_tokens=len(text) * choices)


# -- Redis fixtures -------------------------------------------------------------


def _redis_available(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis, removed afterwards."""
    if not _redis_available(REDIS_URL):
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"loomserve-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for k in client.scan_iter(match=prefix + "*"):
        client.delete(k)
    client.close()


@pytest.fixture
def throwaway_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    with RedisServer() as server:
        yield server


@contextlib.asynccontextmanager
async def caches(redis_prefix: str, **kwargs: Any) -> AsyncIterator[list[ResponseCache]]:
    """The same cache in the shared Redis and in process."""
    async with redis_client(REDIS_URL) as shared:
        yield [ResponseCache(shared, key_prefix=redis_prefix, **kwargs), ResponseCache(None, **kwargs)]


# -- keys -----------------------------------------------------------------------

COMPLETION_BASE: dict[str, Any] = {"model": "smol", "prompt": "Hello", "temperature": 0, "max_tokens": 16}
CHAT_BASE: dict[str, Any] = {"model": "smol", "messages": [{"role": "user", "content": "Hello"}],
                             "temperature": 0, "max_tokens": 16}

# Each override changes what the answer may be (or might, for fields unknown to loomserve),
# so each must give a key of its own.
COMPLETION_CHANGES: list[dict[str, Any]] = [
    {"prompt": "Hello!"},
    {"prompt": "Hello "},
    {"prompt": ["Hello"]},
    {"prompt": [15496]},
    {"model": "other"},
    {"max_tokens": 17},
    {"max_tokens": None},
    {"top_p": 0.9},
    {"top_k": 5},
    {"top_k": -1},
    {"min_p": 0.05},
    {"seed": 7},
    {"seed": 8},
    {"seed": 7, "temperature": 0.7},
    {"seed": 7, "temperature": 0.8},
    {"seed": 7, "n": 2},
    {"seed": 7, "n": 3},
    {"stop": "\n"},
    {"stop": ["\n"]},
    {"stop": ["\n", "."]},
    {"stop_token_ids": [2]},
    {"presence_penalty": 0.5},
    {"frequency_penalty": 0.5},
    {"repetition_penalty": 1.1},
    {"logit_bias": {"42": 5}},
    {"logit_bias": {"42": -5}},
    {"logit_bias": {"43": 5}},
    {"logprobs": 0},
    {"logprobs": 3},
    {"echo": True},
    {"ignore_eos": True},
    {"min_tokens": 4},
    {"skip_special_tokens": False},
    {"return_token_ids": True},
    {"return_tokens_as_token_ids": True},
    {"priority": 1},
    {"suffix": "!"},
    {"best_of": 2},
    {"response_format": {"type": "json_object"}},
    {"x_vendor_extension": 1},
    {"x_vendor_extension": {"nested": [1, 2]}},
]

CHAT_CHANGES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "user", "content": "Hello", "name": "bob"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]},
    {"max_completion_tokens": 16},
    {"logprobs": True},
    {"logprobs": True, "top_logprobs": 2},
    {"add_generation_prompt": False},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "none"},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    {"seed": 7},
    {"top_p": 0.5},
    {"chat_template_kwargs": {"enable_thinking": False}},
]


@pytest.mark.parametrize(("endpoint", "base", "changes"), [(COMPLETIONS, COMPLETION_BASE, COMPLETION_CHANGES),
                                                          (CHAT, CHAT_BASE, CHAT_CHANGES)])
def test_every_field_that_can_change_the_answer_changes_the_key(endpoint: str, base: dict[str, Any],
                                                               changes: list[dict[str, Any]]) -> None:
    keys = {key(base, endpoint=endpoint)}
    for change in changes:
        k = key({**base, **change}, endpoint=endpoint)
        assert k is not None, change
        assert k not in keys, f"{change} gives a key already taken"
        keys.add(k)
    assert None not in keys and len(keys) == len(changes) + 1


def test_identity_fields_change_the_key() -> None:
    base = key(COMPLETION_BASE)
    others = [key(COMPLETION_BASE, tenant="other"), key(COMPLETION_BASE, model="llama"),
              key(COMPLETION_BASE, revision="r2"), key(COMPLETION_BASE, endpoint=CHAT),
              key(COMPLETION_BASE, tenant="")]
    assert len({base, *others}) == 6


def test_tenant_is_not_confused_with_other_key_parts() -> None:
    # Moving text between tenant and model must not give the same key (no naive concatenation).
    assert key(COMPLETION_BASE, tenant="ab", model="c") != key(COMPLETION_BASE, tenant="a", model="bc")


@pytest.mark.parametrize("delivery", [
    {"stream": True},
    {"stream": False},
    {"stream": True, "stream_options": {"include_usage": True}},
    {"stream_options": {"include_usage": False}},
    {"user": "end-user-17"},
    {"stream": True, "stream_options": {"include_usage": True}, "user": "u"},
])
@pytest.mark.parametrize(("endpoint", "base"), [(COMPLETIONS, COMPLETION_BASE), (CHAT, CHAT_BASE)])
def test_delivery_only_fields_do_not_change_the_key(endpoint: str, base: dict[str, Any],
                                                    delivery: dict[str, Any]) -> None:
    assert set(delivery) <= DELIVERY_ONLY_FIELDS
    assert key({**base, **delivery}, endpoint=endpoint) == key(base, endpoint=endpoint)


def test_delivery_denylist_is_small() -> None:
    # Everything not listed here is part of the key; growing this list needs a reason per field.
    assert {"stream", "stream_options", "user"} == DELIVERY_ONLY_FIELDS


@pytest.mark.parametrize(("a", "b"), [
    ({"temperature": 0}, {"temperature": 0.0}),
    ({"temperature": 0}, {"temperature": -0.0}),
    ({"temperature": 0, "top_p": 1}, {"temperature": 0, "top_p": 1.0}),
    ({"temperature": 0, "logit_bias": {"42": 5}}, {"temperature": 0, "logit_bias": {"42": 5.0}}),
    ({"temperature": 0, "presence_penalty": 0.5}, {"temperature": 0, "presence_penalty": 0.50}),
    ({"temperature": 0, "max_tokens": 8, "prompt": "x"}, {"prompt": "x", "max_tokens": 8, "temperature": 0}),
    ({"temperature": 0, "response_format": {"type": "json_schema", "schema": {"a": 1, "b": 2}}},
     {"response_format": {"schema": {"b": 2, "a": 1}, "type": "json_schema"}, "temperature": 0}),
])
def test_equivalent_bodies_share_a_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert key(a) is not None
    assert key(a) == key(b)


def test_numbers_that_differ_keep_distinct_keys() -> None:
    assert key({"temperature": 0, "top_p": 0.1}) != key({"temperature": 0, "top_p": 0.10000000000000002})
    assert key({"temperature": 0, "echo": True}) != key({"temperature": 0, "echo": 1})
    assert key({"temperature": 0, "stop": "1"}) != key({"temperature": 0, "stop": 1})


def test_any_text_gives_a_key() -> None:
    texts = ["héllo", "日本語", "\U0001f600", json.loads('"\\ud800 lone surrogate"'), "\x00"]
    keys = {key({**COMPLETION_BASE, "prompt": t}) for t in texts}
    assert None not in keys and len(keys) == len(texts)


def test_key_is_a_sha256_hex_digest() -> None:
    k = key(COMPLETION_BASE)
    assert k is not None and len(k) == 64 and int(k, 16) >= 0
    assert k == key(dict(COMPLETION_BASE))  # stable across calls


@pytest.mark.parametrize("body", [
    {},  # temperature left out: OpenAI's default 1.0 samples
    {"temperature": None},
    {"temperature": 0.7},
    {"temperature": 2},
    {"temperature": 0, "n": 2},
    {"temperature": 0, "n": "1"},
    {"temperature": "0"},
    {"temperature": True},
    {"temperature": float("nan"), "seed": 1},
    {"temperature": 0, "top_p": float("inf")},
    {"temperature": 0, "logit_bias": {"1": float("-inf")}},
    {"seed": "1"},
    {"seed": 1.5},
    {"seed": True},
    {"seed": None, "temperature": 0.3},
])
def test_nondeterministic_or_malformed_requests_are_not_cacheable(body: dict[str, Any]) -> None:
    assert key(body) is None


@pytest.mark.parametrize("body", [
    {"temperature": 0},
    {"temperature": 0.0},
    {"temperature": 0, "n": 1},
    {"temperature": 0, "n": None},
    {"seed": 0},
    {"seed": 1, "temperature": 1.3},
    {"seed": -5, "temperature": 0.7, "n": 4},
])
def test_greedy_or_seeded_requests_are_cacheable(body: dict[str, Any]) -> None:
    assert is_cacheable(body, default_temperature=1.0)
    assert key(body) is not None


def test_the_servers_sampling_defaults_decide_for_fields_the_body_leaves_out() -> None:
    greedy_model = {**OPENAI_DEFAULTS, "temperature": 0.0}
    assert key({"prompt": "x"}, defaults=greedy_model) is not None
    assert key({"prompt": "x", "temperature": 0.5}, defaults=greedy_model) is None
    carded = {**OPENAI_DEFAULTS, "temperature": 0.2, "top_p": 0.9}
    assert key({"prompt": "x"}, defaults=carded) is None
    seeded = {"prompt": "x", "seed": 3}
    # The same body sampled under other defaults is another answer: never a hit across them.
    assert len({key(seeded, defaults=d) for d in (OPENAI_DEFAULTS, carded, greedy_model)}) == 3


def test_a_body_that_is_not_an_object_is_not_cacheable() -> None:
    assert cache_key("t", "m", "r", COMPLETIONS, ["temperature", 0], OPENAI_DEFAULTS) is None  # type: ignore[arg-type]


def test_a_body_that_is_not_parsed_json_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        key({"temperature": 0, "stop": {"a", "b"}})


# -- Redis ----------------------------------------------------------------------


def test_redis_hit_and_miss(redis_prefix: str) -> None:
    async def go() -> None:
        async with redis_client(REDIS_URL) as shared:
            cache = ResponseCache(shared, key_prefix=redis_prefix)
            assert cache.backend == "redis"
            k = key(COMPLETION_BASE)
            assert k is not None
            assert await cache.get(k) is None
            stored = answer(pieces=3)
            assert await cache.put(k, stored)
            assert await cache.get(k) == stored
            assert await cache.get(key({**COMPLETION_BASE, "max_tokens": 17}) or "") is None
            assert (cache.stats.hits, cache.stats.misses, cache.stats.stores) == (1, 2, 1)

    run(go())
    raw = redis.Redis.from_url(REDIS_URL).get(redis_prefix + (key(COMPLETION_BASE) or ""))
    assert isinstance(raw, bytes) and decode_entry(raw) == answer(pieces=3)


def test_redis_and_memory_give_the_same_answers(redis_prefix: str) -> None:
    async def go() -> None:
        async with caches(redis_prefix) as both:
            for cache in both:
                k = key(CHAT_BASE, endpoint=CHAT)
                assert k is not None
                await cache.put(k, answer(kind="chat", choices=2, pieces=4))
                assert await cache.get(k) == answer(kind="chat", choices=2, pieces=4), cache.backend

    run(go())


def test_tenant_never_gets_another_tenants_entry(redis_prefix: str) -> None:
    async def go() -> None:
        async with caches(redis_prefix) as both:
            for cache in both:
                key_a = key(COMPLETION_BASE, tenant="tenant-a")
                key_b = key(COMPLETION_BASE, tenant="tenant-b")
                assert key_a is not None and key_b is not None and key_a != key_b
                await cache.put(key_a, answer("answer for A"))
                assert await cache.get(key_b) is None, cache.backend
                await cache.put(key_b, answer("answer for B"))
                hit_a, hit_b = await cache.get(key_a), await cache.get(key_b)
                assert hit_a is not None and hit_a.choices[0].text == "answer for A"
                assert hit_b is not None and hit_b.choices[0].text == "answer for B"

    run(go())


def test_redis_entry_expires_after_its_ttl(redis_prefix: str) -> None:
    async def go() -> None:
        async with redis_client(REDIS_URL) as shared:
            cache = ResponseCache(shared, key_prefix=redis_prefix, ttl_s=30)
            short, default = key(COMPLETION_BASE) or "", key({**COMPLETION_BASE, "max_tokens": 3}) or ""
            assert await cache.put(short, answer(), ttl_s=0.3)
            assert await cache.put(default, answer())
            client = redis.Redis.from_url(REDIS_URL)
            assert 0 < client.pttl(redis_prefix + short) <= 300
            assert 29_000 < client.pttl(redis_prefix + default) <= 30_000
            client.close()
            assert await cache.get(short) is not None
            await asyncio.sleep(0.5)
            assert await cache.get(short) is None
            assert await cache.get(default) is not None

    run(go())


def test_entries_over_the_size_bound_are_not_cached(redis_prefix: str) -> None:
    small, big = answer("x" * 10), answer("y" * 5000)
    limit = len(encode_entry(small)) + 100
    assert len(encode_entry(big)) > limit

    async def go() -> None:
        async with caches(redis_prefix, max_entry_bytes=limit) as both:
            for cache in both:
                k_small, k_big = key(COMPLETION_BASE) or "", key({**COMPLETION_BASE, "max_tokens": 999}) or ""
                assert await cache.put(k_small, small)
                assert not await cache.put(k_big, big)
                assert cache.stats.too_large == 1
                assert await cache.get(k_big) is None
                assert await cache.get(k_small) == small

    run(go())
    assert list(redis.Redis.from_url(REDIS_URL).scan_iter(match=redis_prefix + "*")) == [
        (redis_prefix + (key(COMPLETION_BASE) or "")).encode()]


@pytest.mark.parametrize("finish", ["abort", "error"])
def test_answers_that_did_not_finish_normally_are_not_cached(finish: str) -> None:
    async def go() -> None:
        cache = ResponseCache(None)
        k = key(COMPLETION_BASE) or ""
        partial = CachedResponse("completion", [CachedChoice([CachedPiece("ok")], "stop"),
                                                CachedChoice([CachedPiece("cut")], finish)], 1, 2)
        assert not await cache.put(k, partial)
        assert not await cache.put(k, CachedResponse("completion", [], 1, 0))
        assert await cache.get(k) is None
        assert cache.stats.not_replayable == 2

    run(go())


def test_redis_stopped_is_a_miss_without_exception(throwaway_redis: RedisServer) -> None:
    errors: list[str] = []

    async def go() -> None:
        async with redis_client(throwaway_redis.url) as shared:
            cache = ResponseCache(shared, retry_after_s=0.3, on_error=errors.append)
            k = key(COMPLETION_BASE) or ""
            assert await cache.put(k, answer())
            assert await cache.get(k) == answer()

            throwaway_redis.stop()
            started = time.monotonic()
            assert await cache.get(k) is None
            assert not await cache.put(k, answer())  # within the back-off: Redis is not even tried
            assert await cache.get(k) is None
            assert time.monotonic() - started < 1.0
            assert errors == ["get"]
            assert (cache.stats.get_errors, cache.stats.put_errors) == (1, 0)

            await asyncio.sleep(0.35)
            assert not await cache.put(k, answer())
            assert errors == ["get", "put"]
            assert cache.stats.put_errors == 1

            # Back again (empty, as a restarted Redis without persistence is): the cache works again.
            throwaway_redis.start()
            await asyncio.sleep(0.35)
            assert await cache.get(k) is None
            assert await cache.put(k, answer())
            assert await cache.get(k) == answer()
            assert errors == ["get", "put"]

    run(go())


def test_stalled_redis_is_a_miss_within_the_timeout(throwaway_redis: RedisServer) -> None:
    async def go() -> None:
        async with redis_client(throwaway_redis.url) as shared:
            cache = ResponseCache(shared, redis_timeout_s=0.2)
            k = key(COMPLETION_BASE) or ""
            assert await cache.put(k, answer())
            throwaway_redis.pause(2.0)
            started = time.monotonic()
            assert await cache.get(k) is None
            assert time.monotonic() - started < 1.0
            assert cache.stats.get_errors == 1

    run(go())


def test_unreachable_redis_is_a_quick_miss() -> None:
    async def go() -> None:
        async with redis_client(f"redis://127.0.0.1:{free_port()}/0") as shared:
            cache = ResponseCache(shared)
            k = key(COMPLETION_BASE) or ""
            started = time.monotonic()
            assert await cache.get(k) is None
            assert not await cache.put(k, answer())
            assert time.monotonic() - started < 1.0
            assert cache.stats.get_errors == 1

    run(go())


def test_damaged_entry_is_a_miss(redis_prefix: str) -> None:
    k = key(COMPLETION_BASE) or ""
    client = redis.Redis.from_url(REDIS_URL)
    client.set(redis_prefix + k, b'{"kind": "completion", "choices": "not a list"}')
    client.close()

    async def go() -> None:
        async with redis_client(REDIS_URL) as shared:
            cache = ResponseCache(shared, key_prefix=redis_prefix)
            assert await cache.get(k) is None
            assert cache.stats.misses == 1

    run(go())


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        ResponseCache(None, ttl_s=0)
    with pytest.raises(ValueError):
        ResponseCache(None, max_entry_bytes=0)


# -- in process -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_evicts_the_least_recently_used_entry() -> None:
    store = LRUStore(max_entries=3, max_bytes=1 << 20)
    for name in "abc":
        assert store.put(name, name.encode() * 10, ttl_s=60)
    assert store.get("a") is not None  # a is now the most recently used
    store.put("d", b"d" * 10, ttl_s=60)
    assert "b" not in store
    assert all(n in store for n in "acd")
    assert len(store) == 3


def test_lru_is_bounded_by_bytes() -> None:
    store = LRUStore(max_entries=100, max_bytes=100)
    for i in range(5):
        store.put(str(i), b"x" * 30, ttl_s=60)
    assert store.nbytes <= 100
    assert [str(i) in store for i in range(5)] == [False, False, True, True, True]
    assert not store.put("huge", b"x" * 101, ttl_s=60)  # larger than the whole store
    assert store.nbytes == 90
    store.put("3", b"x" * 5, ttl_s=60)  # replacing an entry replaces its bytes
    assert store.nbytes == 65


def test_lru_entries_expire() -> None:
    clock = FakeClock()
    store = LRUStore(max_entries=10, max_bytes=1000, clock=clock)
    store.put("a", b"1", ttl_s=5)
    store.put("b", b"2", ttl_s=50)
    clock.now += 4.9
    assert store.get("a") == b"1"
    clock.now += 0.2
    assert store.get("a") is None
    assert "a" not in store and store.nbytes == 1
    assert store.get("b") == b"2"


def test_in_process_cache_is_bounded_and_expires() -> None:
    clock = FakeClock()
    one = encode_entry(answer())

    async def go() -> None:
        cache = ResponseCache(None, ttl_s=10, max_entries=2, max_bytes=10 * len(one), clock=clock)
        assert cache.backend == "memory"
        keys = [key({**COMPLETION_BASE, "max_tokens": i}) or "" for i in range(3)]
        for k in keys:
            assert await cache.put(k, answer())
        assert await cache.get(keys[0]) is None  # evicted: two entries at most
        assert await cache.get(keys[2]) == answer()
        clock.now += 11
        assert await cache.get(keys[2]) is None
        assert (cache.stats.hits, cache.stats.misses) == (1, 2)

    run(go())


def test_in_process_entries_are_copies() -> None:
    async def go() -> None:
        cache = ResponseCache(None)
        k = key(COMPLETION_BASE) or ""
        await cache.put(k, answer())
        first = await cache.get(k)
        assert first is not None
        first.choices[0].pieces[0].token_ids.append(-1)  # a caller changing its copy
        assert await cache.get(k) == answer()

    run(go())


# -- entries ------------------------------------------------------------


def chat_lp(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


def recorded_chat() -> CachedResponse:
    rec = ResponseRecorder("chat", 2)
    rec.add(0, "Hel", [1, 2], {"content": [chat_lp("He", -0.1), chat_lp("l", -0.2)]})
    rec.add(1, "Bye", [7], {"content": [chat_lp("Bye", -0.5)]}, "length")
    assert rec.result(prompt_tokens=4, completion_tokens=4) is None  # choice 0 has not finished
    rec.add(0, "lo", [3], {"content": [chat_lp("lo", -0.3)]}, "stop")
    result = rec.result(prompt_tokens=4, completion_tokens=4)
    assert result is not None
    return result


def test_recorder_builds_the_entry() -> None:
    cached = recorded_chat()
    assert [c.text for c in cached.choices] == ["Hello", "Bye"]
    assert [c.token_ids for c in cached.choices] == [[1, 2, 3], [7]]
    assert [c.finish_reason for c in cached.choices] == ["stop", "length"]
    assert cached.usage() == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert decode_entry(encode_entry(cached)) == cached


def test_cached_answer_replays_the_same_after_a_redis_round_trip(redis_prefix: str) -> None:
    async def go() -> None:
        async with redis_client(REDIS_URL) as shared:
            cache = ResponseCache(shared, key_prefix=redis_prefix)
            k = key(CHAT_BASE, endpoint=CHAT) or ""
            await cache.put(k, recorded_chat())
            hit = await cache.get(k)
            assert hit is not None
            renderer = ChatRenderer("a", "m", clock=lambda: 1)
            assert (list(renderer.replay_events(hit, include_usage=True))
                    == list(renderer.replay_events(recorded_chat(), include_usage=True)))

    run(go())


def test_hit_header() -> None:
    assert (CACHE_HEADER, CACHE_HIT) == ("x-loomserve-cache", "hit")
