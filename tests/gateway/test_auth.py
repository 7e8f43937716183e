"""API keys: deny by default over every route, header forms, key sources, and constant-time lookup."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from loomserve.gateway import auth
from loomserve.gateway.auth import (
    AuthMiddleware,
    KeyRecord,
    KeyStore,
    Principal,
    RedisKeySource,
    generate_key,
    hash_key,
    load_keys_file,
)
from loomserve.gateway.limits import Limits
from tests.gateway.redis_clients import redis_client
from tests.redis_server import RedisServer

PUBLIC = {"/health", "/ready", "/metrics"}
ACME_KEY = "lsk-acme-ci-key"
GLOBEX_KEY = "lsk-globex-key"
RECORDS = [
    KeyRecord("acme", "ci", hash_key(ACME_KEY), Limits(requests_per_minute=60)),
    KeyRecord("globex", "batch", hash_key(GLOBEX_KEY)),
]


async def whoami(request: Request) -> Response:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        return JSONResponse({"principal": None})
    return JSONResponse({"tenant": principal.tenant, "key_name": principal.key_name,
                         "key_digest_prefix": principal.key_digest_prefix,
                         "limits": None if principal.limits is None else principal.limits.requests_per_minute})


async def socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(websocket.scope["state"]["principal"].tenant)
    await websocket.close()


def build_app(keys: KeyStore) -> Starlette:
    routes = [
        Route("/health", whoami, methods=["GET"]),
        Route("/ready", whoami, methods=["GET"]),
        Route("/metrics", whoami, methods=["GET"]),
        Route("/v1/models", whoami, methods=["GET"]),
        Route("/v1/models/{model}", whoami, methods=["GET", "DELETE"]),
        Route("/v1/completions", whoami, methods=["POST"]),
        Route("/v1/chat/completions", whoami, methods=["POST"]),
        Route("/admin/flush", whoami, methods=["POST", "PUT"]),
        WebSocketRoute("/v1/realtime", socket),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(AuthMiddleware, keys=keys, public_paths=PUBLIC)
    return app


async def acall(app: Starlette, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.request(method, path, headers=headers)


def call(app: Starlette, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return asyncio.run(acall(app, method, path, headers))


def concrete(path: str) -> str:
    return path.replace("{model}", "some-model")


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error" and error["code"] == code and error["param"] is None


@pytest.fixture
def app() -> Starlette:
    return build_app(KeyStore(RECORDS))


def test_every_route_needs_a_key_except_the_allowlist(app: Starlette) -> None:
    checked = 0
    for route in app.routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method == "HEAD":
                    continue
                response = call(app, method, concrete(route.path))
                if route.path in PUBLIC:
                    assert response.status_code == 200, (method, route.path)
                else:
                    assert_refused(response, "missing_api_key")
                    ok = call(app, method, concrete(route.path), {"authorization": f"Bearer {ACME_KEY}"})
                    assert ok.status_code == 200, (method, route.path)
                checked += 1
        else:
            assert isinstance(route, WebSocketRoute)
            with TestClient(app) as client, pytest.raises(WebSocketDisconnect) as closed, \
                    client.websocket_connect(route.path):
                pass
            assert closed.value.code == 1008
            with TestClient(app) as client, client.websocket_connect(route.path,
                                                                     headers={"x-api-key": ACME_KEY}) as ws:
                assert ws.receive_text() == "acme"
            checked += 1
    assert checked == 11


async def raw_status(app: Starlette, path: str) -> int:
    """Send ``path`` as it is: an HTTP client would normalise some of these before sending."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "server": ("gw", 80), "client": ("127.0.0.1", 1234)}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


@pytest.mark.parametrize("path", ["/health/", "/HEALTH", "//health", "/health/x", "/healthz", "/./health",
                                  "/metrics/../v1/models", "/health;x", "/health ", "health", "/v1/models/", "/"])
def test_allowlist_is_exact(app: Starlette, path: str) -> None:
    assert asyncio.run(raw_status(app, path)) == 401
    assert asyncio.run(raw_status(app, "/health")) == 200


def test_unrouted_paths_also_need_a_key(app: Starlette) -> None:
    assert_refused(call(app, "GET", "/does/not/exist"), "missing_api_key")
    assert call(app, "GET", "/does/not/exist", {"x-api-key": ACME_KEY}).status_code == 404


@pytest.mark.parametrize("value", [f"Bearer {ACME_KEY}", f"bearer {ACME_KEY}", f"BEARER {ACME_KEY}",
                                   f"BeArEr {ACME_KEY}", f"  Bearer   {ACME_KEY}  ", f"Bearer\t{ACME_KEY}"])
def test_bearer_in_any_case_and_spacing(app: Starlette, value: str) -> None:
    response = call(app, "GET", "/v1/models", {"authorization": value})
    assert response.status_code == 200
    assert response.json()["tenant"] == "acme"


def test_x_api_key(app: Starlette) -> None:
    response = call(app, "GET", "/v1/models", {"x-api-key": f" {GLOBEX_KEY} "})
    assert response.status_code == 200 and response.json()["tenant"] == "globex"
    same_twice = call(app, "GET", "/v1/models", {"x-api-key": ACME_KEY, "authorization": f"Bearer {ACME_KEY}"})
    assert same_twice.status_code == 200


def test_principal_in_scope(app: Starlette) -> None:
    body = call(app, "POST", "/v1/completions", {"authorization": f"Bearer {ACME_KEY}"}).json()
    assert body == {"tenant": "acme", "key_name": "ci", "key_digest_prefix": hash_key(ACME_KEY)[:12], "limits": 60}
    body = call(app, "POST", "/v1/completions", {"authorization": f"Bearer {GLOBEX_KEY}"}).json()
    assert body["tenant"] == "globex" and body["limits"] is None


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer lsk-wrong"},
    {"x-api-key": "lsk-wrong"},
    {"authorization": f"Bearer {ACME_KEY}x"},
    {"authorization": f"Bearer {hash_key(ACME_KEY)}"},  # the digest is not the key
])
def test_wrong_key(app: Starlette, headers: dict[str, str]) -> None:
    response = call(app, "GET", "/v1/models", headers)
    assert_refused(response, "invalid_api_key")
    assert ACME_KEY not in response.text and "lsk-wrong" not in response.text


@pytest.mark.parametrize("headers", [
    {"authorization": ACME_KEY},
    {"authorization": f"Basic {ACME_KEY}"},
    {"authorization": "Bearer"},
    {"authorization": "Bearer "},
    {"authorization": f"Bearer {ACME_KEY} extra"},
    {"authorization": f"Token {ACME_KEY}"},
    {"x-api-key": ""},
    {"authorization": f"Bearer {ACME_KEY}", "x-api-key": GLOBEX_KEY},  # two different keys
])
def test_malformed_or_ambiguous(app: Starlette, headers: dict[str, str]) -> None:
    assert_refused(call(app, "GET", "/v1/models", headers), "invalid_api_key")


def test_public_paths_ignore_bad_keys(app: Starlette) -> None:
    response = call(app, "GET", "/health", {"authorization": "Bearer lsk-wrong"})
    assert response.status_code == 200 and response.json() == {"principal": None}


def test_timing_safe_comparison_over_every_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real_compare_digest = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real_compare_digest(a, b)

    records = [KeyRecord(f"t{i}", "k", hash_key(f"lsk-{i}")) for i in range(5)]
    store = KeyStore(records)
    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for key, tenant in [("lsk-0", "t0"), ("lsk-4", "t4"), ("lsk-unknown", None)]:
        compared.clear()
        principal = asyncio.run(store.authenticate(key))
        assert (principal.tenant if principal else None) == tenant
        # No early exit on a match, and never the key itself: its digest against each configured digest.
        assert sorted(a for a, _ in compared) == sorted(bytes.fromhex(r.sha256) for r in records)
        assert all(b == bytes.fromhex(hash_key(key)) for _, b in compared)


def test_open_mode_warns_and_admits_as_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loomserve.gateway.auth")
    app = build_app(KeyStore())
    for headers in (None, {"authorization": "Bearer whatever"}):
        body = call(app, "POST", "/v1/chat/completions", headers).json()
        assert body["tenant"] == "default" and body["limits"] is None
    # Starlette builds its middleware once, at the first call (the lifespan startup under uvicorn).
    warnings = [r for r in caplog.records if r.name == "loomserve.gateway.auth" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "open to anyone" in warnings[0].getMessage()


def test_no_warning_when_keys_are_configured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loomserve.gateway.auth")
    call(build_app(KeyStore(RECORDS)), "GET", "/health")
    assert not [r for r in caplog.records if r.name == "loomserve.gateway.auth"]


# -- keys file --------------------------------------------------------------------------

def test_generate_key() -> None:
    key, digest = generate_key()
    assert key.startswith("lsk-") and len(key) >= 4 + 43
    assert digest == hash_key(key) and len(digest) == 64
    assert generate_key()[0] != key


def test_keys_file_loading(tmp_path: Path) -> None:
    key, digest = generate_key()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"tenant": "acme", "name": "ci", "sha256": digest,
         "limits": {"requests_per_minute": 60, "tokens_per_minute": 10000, "token_burst": 2000}},
        {"tenant": "globex", "name": "batch", "sha256": hash_key("lsk-other")},
    ]}))
    records = load_keys_file(path)
    assert records[0] == KeyRecord("acme", "ci", digest, Limits(requests_per_minute=60, tokens_per_minute=10000,
                                                               token_burst=2000))
    assert records[1].limits is None
    principal = asyncio.run(KeyStore(records).authenticate(key))
    assert principal == Principal("acme", "ci", digest[:12], records[0].limits)


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read"),
    ('{"tenants": []}', '{"keys": [...]}'),
    ('{"keys": ["x"]}', "keys[0] must be an object"),
    (json.dumps({"keys": [{"tenant": "acme", "sha256": "lsk-plaintext-key"}]}), "64 lowercase hex"),
    (json.dumps({"keys": [{"tenant": "acme", "sha256": hash_key("a").upper()}]}), "64 lowercase hex"),
    (json.dumps({"keys": [{"tenant": "ac me", "sha256": hash_key("a")}]}), "tenant 'ac me'"),
    (json.dumps({"keys": [{"tenant": "{acme}", "sha256": hash_key("a")}]}), "tenant"),
    (json.dumps({"keys": [{"sha256": hash_key("a")}]}), "tenant"),
    (json.dumps({"keys": [{"tenant": "acme", "sha256": hash_key("a"), "key": "lsk-a"}]}), "unknown fields"),
    (json.dumps({"keys": [{"tenant": "acme", "sha256": hash_key("a"), "limits": {"rpm": 5}}]}), "unknown limit"),
    (json.dumps({"keys": [{"tenant": "acme", "sha256": hash_key("a"), "limits": {"requests_per_minute": 0}}]}),
     "positive integer"),
    (json.dumps({"keys": [{"tenant": "a", "sha256": hash_key("a")}, {"tenant": "b", "sha256": hash_key("a")}]}),
     "more than once"),
])
def test_keys_file_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        load_keys_file(path)
    assert message in str(error.value)


def test_missing_keys_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_keys_file(tmp_path / "absent.json")


# -- Redis key source -----------------------------------------------------------------------

@pytest.fixture
def key_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_redis_key_source(key_redis: RedisServer) -> None:
    client = redis.Redis.from_url(key_redis.url)
    key, digest = generate_key()
    client.hset(f"loomserve:keys:{digest}", mapping={
        "tenant": "initech", "name": "dashboard", "limits": json.dumps({"tokens_per_minute": 5000})})
    broken_key, broken_digest = generate_key()
    client.hset(f"loomserve:keys:{broken_digest}", mapping={"name": "no tenant"})

    async def run() -> None:
        # One event loop for the whole test: the client's connection pool belongs to it.
        async with redis_client(key_redis.url) as shared:
            keys = KeyStore(RECORDS, redis_keys=True)
            keys.connect_redis(shared)
            app = build_app(keys)
            source = RedisKeySource(shared)
            body = (await acall(app, "GET", "/v1/models", {"authorization": f"Bearer {key}"})).json()
            assert body["tenant"] == "initech" and body["key_name"] == "dashboard"
            principal = await source.lookup(digest)
            assert principal is not None and principal.limits == Limits(tokens_per_minute=5000)
            assert (await acall(app, "GET", "/v1/models", {"x-api-key": ACME_KEY})).json()["tenant"] == "acme"
            assert_refused(await acall(app, "GET", "/v1/models", {"x-api-key": "lsk-nobody"}), "invalid_api_key")
            assert_refused(await acall(app, "GET", "/v1/models", {"x-api-key": broken_key}), "invalid_api_key")

            client.delete(f"loomserve:keys:{digest}")  # revoked: refused at once, no restart
            assert_refused(await acall(app, "GET", "/v1/models", {"authorization": f"Bearer {key}"}),
                           "invalid_api_key")

            client.hset(f"loomserve:keys:{digest}", mapping={"tenant": "initech", "name": "dashboard"})
            key_redis.stop()
            for _ in range(3):
                down = await acall(app, "GET", "/v1/models", {"authorization": f"Bearer {key}"})
                assert down.status_code == 503 and down.headers["retry-after"] == "1"
                assert down.json()["error"]["code"] == "auth_unavailable"
            # Keys in the file do not need Redis, nor do public paths.
            assert (await acall(app, "GET", "/v1/models", {"x-api-key": ACME_KEY})).status_code == 200
            assert (await acall(app, "GET", "/health")).status_code == 200

    try:
        asyncio.run(run())
    finally:
        client.close()


def test_redis_source_alone_is_not_open_mode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loomserve.gateway.auth")
    app = build_app(KeyStore(redis_keys=True))
    assert_refused(call(app, "GET", "/v1/models"), "missing_api_key")
    assert not [r for r in caplog.records if r.name == "loomserve.gateway.auth"]


def test_redis_keys_before_the_client_is_connected_are_unavailable() -> None:
    """The gateway connects its key store at start-up; a lookup before that cannot say."""
    down = call(build_app(KeyStore(RECORDS, redis_keys=True)), "GET", "/v1/models", {"x-api-key": "lsk-nobody"})
    assert down.status_code == 503 and down.json()["error"]["code"] == "auth_unavailable"


def test_a_record_that_is_not_utf8_is_refused(key_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    _, digest = generate_key()
    client = redis.Redis.from_url(key_redis.url)
    client.hset(f"loomserve:keys:{digest}", mapping={"tenant": b"\xff\xfe", "name": "garbled"})
    client.close()

    async def run() -> None:
        async with redis_client(key_redis.url) as shared:
            assert await RedisKeySource(shared).lookup(digest) is None

    asyncio.run(run())
    assert any("has an invalid record" in r.getMessage() for r in caplog.records)
