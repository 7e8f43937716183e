"""The production gateway through a real stack: API keys, Redis rate limits and
response cache, metrics, traces exported over OTLP, the OpenAI parameters, and
hostile requests. Redis is the machine's real one (127.0.0.1:6379); tenant names
are unique per run so nothing collides with earlier runs."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loomserve.gateway.app import create_app
from loomserve.gateway.auth import KeyStore, generate_key
from loomserve.gateway.engine_client import EngineClient
from loomserve.gateway.model_info import ModelInfo
from loomserve.gateway.sampling_defaults import load_sampling_defaults
from loomserve.gateway.tokenizer import load_tokenizer
from loomserve.shared.config import GatewayConfig
from tests.otlp_receiver import OTLPReceiver
from tests.stack import ServeStack

MODEL = "SmolLM2-135M-Instruct"
RUN = uuid.uuid4().hex[:8]
TENANT_A, TENANT_B, TENANT_LIMITED = f"acme-{RUN}", f"globex-{RUN}", f"tiny-{RUN}"
KEY_A, DIGEST_A = generate_key()
KEY_B, DIGEST_B = generate_key()
KEY_LIMITED, DIGEST_LIMITED = generate_key()


@pytest.fixture(scope="module")
def otlp() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, otlp: OTLPReceiver,
           default_model_path: Path) -> Iterator[ServeStack]:
    folder = tmp_path_factory.mktemp("secure")
    keys = folder / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"tenant": TENANT_A, "name": "a", "sha256": DIGEST_A},
        {"tenant": TENANT_B, "name": "b", "sha256": DIGEST_B},
        {"tenant": TENANT_LIMITED, "name": "limited", "sha256": DIGEST_LIMITED,
         "limits": {"requests_per_minute": 2, "request_burst": 2}},
    ]}))
    # A generous Redis budget: on a loaded 2-core host a round trip can pass the default 50 ms, and
    # this stack is about the limits, not about a slow Redis (tests/gateway/test_ratelimit.py is).
    server = ServeStack("--kv-cache-gb", "0.25", "--keys-file", str(keys), "--redis-url", "redis://127.0.0.1:6379/0",
                        "--rate-limit-timeout-ms", "2000", "--otlp-endpoint", otlp.endpoint,
                        "--price-per-1m-input-usd", "1", "--price-per-1m-output-usd", "2",
                        log_path=folder / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


def _client(stack: ServeStack, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_every_route_needs_a_key_except_the_allowlist(secure: ServeStack, default_model_path: Path) -> None:
    model = ModelInfo(MODEL, load_tokenizer(default_model_path), [2], "r",
                      load_sampling_defaults("auto", default_model_path))
    engine = EngineClient("tcp://127.0.0.1:9")  # never started: the app is only read for its routes
    app = create_app(GatewayConfig(), engine, model, KeyStore())
    routes = [(route.path, method) for route in app.routes for method in (route.methods or []) if method != "HEAD"]  # type: ignore[attr-defined]
    asyncio.run(engine.close())
    assert len(routes) >= 7
    public = {"/health", "/ready"}
    for path, method in routes:
        resp = httpx.request(method, secure.base_url + path, json={}, timeout=30)
        if path in public:
            assert resp.status_code != 401, (method, path)
        else:
            assert resp.status_code == 401, (method, path, resp.status_code)
            assert resp.json()["error"]["code"] == "missing_api_key"
            assert resp.headers["www-authenticate"] == "Bearer"
        bad = httpx.request(method, secure.base_url + path, json={}, headers={"authorization": "Bearer lsk-wrong"},
                            timeout=30)
        if path not in public:
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    for headers in ({"authorization": f"bearer {KEY_A}"}, {"Authorization": f"BEARER   {KEY_A}"},
                    {"x-api-key": KEY_A}):
        assert httpx.get(secure.base_url + "/v1/models", headers=headers, timeout=30).status_code == 200
    # /metrics is not public unless --public-metrics
    assert httpx.get(secure.base_url + "/metrics", timeout=30).status_code == 401


def test_ready_runs_a_one_token_generation(secure: ServeStack) -> None:
    status, body = secure.get("/ready", timeout=30)
    assert status == 200 and body["status"] == "ready" and body["generation_ms"] > 0


def test_rate_limit_answers_429_with_retry_after(secure: ServeStack) -> None:
    client = _client(secure, KEY_LIMITED)
    for _ in range(2):
        ok = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=1, temperature=0.5)
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1, temperature=0.5)
    headers = limited.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 30
    assert headers["x-ratelimit-remaining-requests"] == "0"
    metrics = httpx.get(secure.base_url + "/metrics", headers={"x-api-key": KEY_A}, timeout=30).text
    assert f'loomserve_rate_limit_rejections_total{{limit="requests",tenant="{TENANT_LIMITED}"}} 1.0' in metrics


def test_response_cache_hits_and_never_crosses_tenants(secure: ServeStack) -> None:
    body = {"model": MODEL, "prompt": f"Cache me {RUN}:", "max_tokens": 8, "temperature": 0}
    first = httpx.post(secure.base_url + "/v1/completions", json=body, headers={"x-api-key": KEY_A}, timeout=60)
    second = httpx.post(secure.base_url + "/v1/completions", json=body, headers={"x-api-key": KEY_A}, timeout=60)
    other = httpx.post(secure.base_url + "/v1/completions", json=body, headers={"x-api-key": KEY_B}, timeout=60)
    assert "x-loomserve-cache" not in first.headers
    assert second.headers["x-loomserve-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert "x-loomserve-cache" not in other.headers, "tenant B must not receive tenant A's entry"
    streamed = httpx.post(secure.base_url + "/v1/completions", headers={"x-api-key": KEY_A}, timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["x-loomserve-cache"] == "hit"
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    assert text == first.json()["choices"][0]["text"]
    assert json.loads(events[-2])["usage"] == first.json()["usage"]
    sampled = httpx.post(secure.base_url + "/v1/completions", headers={"x-api-key": KEY_A}, timeout=60,
                         json={**body, "temperature": 0.7})
    again = httpx.post(secure.base_url + "/v1/completions", headers={"x-api-key": KEY_A}, timeout=60,
                       json={**body, "temperature": 0.7})
    assert "x-loomserve-cache" not in sampled.headers and "x-loomserve-cache" not in again.headers


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_follow_requests(secure: ServeStack) -> None:
    def scrape() -> str:
        return httpx.get(secure.base_url + "/metrics", headers={"x-api-key": KEY_B}, timeout=30).text

    before = scrape()
    _client(secure, KEY_B).completions.create(model=MODEL, prompt=f"metrics {RUN}", max_tokens=4, temperature=0.5)
    after = scrape()
    assert _metric(after, "loomserve_requests_total") == _metric(before, "loomserve_requests_total") + 1
    assert _metric(after, f'loomserve_completion_tokens_total{{tenant="{TENANT_B}"}}') - _metric(
        before, f'loomserve_completion_tokens_total{{tenant="{TENANT_B}"}}') == 4
    assert _metric(after, f'loomserve_cost_usd_total{{tenant="{TENANT_B}"}}') > 0
    assert _metric(after, "loomserve_ttft_seconds_count") == _metric(before, "loomserve_ttft_seconds_count") + 1
    for name in ("loomserve_kv_blocks_total", "loomserve_queue_depth", "loomserve_running_sequences",
                 "loomserve_prefix_cache_queries_total", "loomserve_preemptions_total"):
        assert name in after


def test_one_trace_from_gateway_through_scheduler_to_worker(secure: ServeStack, otlp: OTLPReceiver) -> None:
    otlp.clear()
    resp = _client(secure).completions.with_raw_response.create(model=MODEL, prompt=f"trace {RUN}", max_tokens=3,
                                                                temperature=0.5)
    request_id = resp.headers["x-request-id"]
    assert request_id
    wanted = {"POST /v1/completions", "generate", "scheduler.request", "worker.step", "scheduler.queue",
              "scheduler.prefill", "scheduler.decode"}
    deadline = time.monotonic() + 60  # batch exporters flush every few seconds, slower under load
    spans: dict[str, Any] = {}
    while time.monotonic() < deadline:
        roots = [s for s in otlp.spans if s.attributes.get("loomserve.request_id") == request_id]
        if roots:
            spans = {s.name: s for s in otlp.spans if s.trace_id == roots[0].trace_id}
            if wanted <= set(spans):
                break
        time.sleep(0.2)
    assert wanted <= set(spans), sorted(spans)
    root, generate = spans["POST /v1/completions"], spans["generate"]
    sched, worker = spans["scheduler.request"], spans["worker.step"]
    assert len({root.trace_id, generate.trace_id, sched.trace_id, worker.trace_id}) == 1
    assert generate.parent_span_id == root.span_id
    assert sched.parent_span_id == generate.span_id
    assert worker.parent_span_id == sched.span_id
    for child in ("scheduler.queue", "scheduler.prefill", "scheduler.decode"):
        assert spans[child].parent_span_id == sched.span_id
    assert {root.service_name, sched.service_name, worker.service_name} == {
        "loomserve-gateway", "loomserve-scheduler", "loomserve-worker"}
    assert not any(f"trace {RUN}" in json.dumps(s.attributes) for s in otlp.spans), "prompt text leaked into spans"


def test_every_openai_parameter(secure: ServeStack) -> None:
    client = _client(secure)
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={"260": 100}, extra_body={"return_token_ids": True})
    assert forced.choices[0].model_extra is not None
    assert forced.choices[0].model_extra["token_ids"] == [260] * 4
    for stream in (False, True):
        kwargs: dict[str, Any] = dict(model=MODEL, max_tokens=12, n=2, temperature=0.8, top_p=0.9, seed=7,
                                      presence_penalty=0.5, frequency_penalty=0.5, stop=["\n\n", "zzz"], user="u-1",
                                      extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        create: Any = client.chat.completions.create
        chat: Any = create(messages=[{"role": "user", "content": "Name two fruits."}], logprobs=True, top_logprobs=3,
                           stream=stream, **kwargs)
        if stream:
            chunks = list(chat)
            indexes = {c.index for chunk in chunks for c in chunk.choices}
            usage = chunks[-1].usage
            tops = [t for chunk in chunks for c in chunk.choices if c.logprobs for t in c.logprobs.content]
        else:
            indexes = {c.index for c in chat.choices}
            usage = chat.usage
            tops = [t for c in chat.choices for t in c.logprobs.content]
        assert indexes == {0, 1}
        assert usage is not None and 0 < usage.completion_tokens <= 24
        assert tops and all(len(t.top_logprobs) == 3 for t in tops)
    limited = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to 100."}],
                                             max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert limited.usage is not None and limited.usage.completion_tokens == 5
    assert limited.choices[0].finish_reason == "length"
    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0,
                                           logprobs=2, stop="zzz")
    assert completion.choices[0].logprobs is not None
    assert len(completion.choices[0].logprobs.tokens or []) == 5


def _raw(port: int, payload: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        head = sock.recv(4096).decode(errors="replace")
    return int(head.split(" ", 2)[1])


HOSTILE: list[tuple[str, bytes | dict[str, Any], int]] = [
    ("bad json", b"{", 400),
    ("not an object", b'"hello"', 400),
    ("wrong type", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400),
    ("NaN temperature", b'{"prompt": "x", "temperature": NaN}', 400),
    ("huge n", {"prompt": "x", "n": 100000}, 400),
    ("huge max_tokens", {"prompt": "x", "max_tokens": 10**12}, 400),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -1}, 400),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404),
    ("empty prompt", {"prompt": ""}, 400),
    ("token out of range", {"prompt": [1, 10**9]}, 400),
    ("too many stop strings", {"prompt": "x", "stop": ["a"] * 100}, 400),
    ("absurd logprobs", {"prompt": "x", "logprobs": 1000}, 400),
    ("bad logit_bias", {"prompt": "x", "logit_bias": {"abc": 1}}, 400),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', 400),
]


@pytest.mark.parametrize(("name", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_the_right_error_and_harm_nothing(secure: ServeStack, name: str,
                                                               body: bytes | dict[str, Any], status: int) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(secure.base_url + "/v1/completions", content=content, timeout=30,
                      headers={"content-type": "application/json", "x-api-key": KEY_A})
    assert resp.status_code == status, resp.text
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    chat = httpx.post(secure.base_url + "/v1/chat/completions", json={"messages": []}, timeout=30,
                      headers={"x-api-key": KEY_A})
    assert chat.status_code == 400
    ok = _client(secure).completions.create(model=MODEL, prompt="still fine?", max_tokens=2, temperature=0.5,
                                            extra_body={"ignore_eos": True})
    assert ok.usage is not None and ok.usage.completion_tokens == 2


def test_oversized_body_and_headers(secure: ServeStack) -> None:
    big = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    resp = httpx.post(secure.base_url + "/v1/completions", content=big, timeout=60,
                      headers={"content-type": "application/json", "x-api-key": KEY_A})
    assert resp.status_code == 413
    huge_header = ("GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + "j" * 200_000 + "\r\n\r\n").encode()
    assert _raw(secure.port, huge_header) in (400, 413, 431)
    assert secure.get("/health")[0] == 200
