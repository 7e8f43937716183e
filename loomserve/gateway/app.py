"""The OpenAI-compatible HTTP API.

    POST /v1/completions        prompt (text, token ids, or a batch of either)
    POST /v1/chat/completions   messages, rendered with the model's chat template
    GET  /v1/models
    GET  /health                200 when the scheduler answers and its workers are ready

A request becomes one engine request per prompt, carrying its ``n`` choices (the
scheduler prefills the prompt once and forks it); the outputs of every choice are
merged into one response, or one SSE stream ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loomserve.gateway.asgi import ClientDisconnected, SSEResponse, race_disconnect
from loomserve.gateway.auth import OPEN_TENANT, AuthMiddleware, KeyStore, Principal
from loomserve.gateway.engine_client import EngineClient, EngineError
from loomserve.gateway.generation import ChoiceDelta, ChoiceResult, merged_choices
from loomserve.gateway.lifecycle import RequestLifecycle
from loomserve.gateway.metrics import GatewayMetrics
from loomserve.gateway.model_info import ModelInfo
from loomserve.gateway.preparation import PreparedRequest, RequestPreparer
from loomserve.gateway.protocol import APIError
from loomserve.gateway.ratelimit import RateLimitExceeded
from loomserve.gateway.rendering import DONE, ChatRenderer, CompletionRenderer, Renderer, TokenText, error_event, usage
from loomserve.gateway.response_cache import CACHE_HEADER, CACHE_HIT, CachedResponse, ResponseRecorder, cache_key
from loomserve.gateway.services import Services, open_services
from loomserve.shared import messages as m
from loomserve.shared.config import GatewayConfig
from loomserve.shared.tracing import get_tracer, inject_traceparent

log = logging.getLogger(__name__)


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


class Gateway:
    def __init__(self, config: GatewayConfig, engine: EngineClient, model: ModelInfo, keys: KeyStore) -> None:
        self.config = config
        self.engine = engine
        self.model = model
        self.keys = keys
        self.preparer = RequestPreparer(model, self._max_model_len)
        self.token_text = TokenText(model.tokenizer)
        self.token_id_text = TokenText(model.tokenizer, as_ids=True)
        self.metrics = GatewayMetrics(config.price_per_1m_input_usd, config.price_per_1m_output_usd)
        self.services: Services | None = None
        self.tracer = get_tracer("loomserve.gateway")
        self.admin_tenants = {t.strip() for t in config.admin_tenants.split(",") if t.strip()}

    async def start(self) -> None:
        # Here, inside the event loop: redis.asyncio binds its connections to the loop that opens them.
        self.services = await open_services(self.config, self.keys, self.metrics.observe_cache_error)
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.close()
        if self.services is not None:
            await self.services.aclose()

    # -- routes --------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        problem = self.engine.engine_problem()
        if problem is not None:
            return _json_response(503, {"status": "unavailable", "reason": problem})
        status = self.engine.status
        assert status is not None
        return _json_response(200, {
            "status": "ok",
            "model": self.model.name,
            "device": status.device,
            "kv_blocks": status.num_total_blocks,
            "kv_blocks_free": status.num_free_blocks,
            "num_running": status.num_running,
            "num_waiting": status.num_waiting,
            "num_preemptions": status.num_preemptions,
            "max_model_len": status.max_model_len,
            # scheduler counters since start: prompt tokens admitted and found in the prefix
            # cache, tokens computed, parallel-sampling forks and their copied blocks
            "prefix_cache_queries": status.prefix_cache_queries,
            "prefix_cache_hits": status.prefix_cache_hits,
            "num_scheduled_tokens": status.num_scheduled_tokens,
            "num_forks": status.num_forks,
            "num_block_copies": status.num_block_copies,
        })

    async def models(self, request: Request) -> Response:
        status = self.engine.status
        return _json_response(200, {"object": "list", "data": [{
            "id": self.model.name,
            "object": "model",
            "created": 0,
            "owned_by": "loomserve",
            "max_model_len": status.max_model_len if status else None,
        }]})

    async def ready(self, request: Request) -> Response:
        """Scheduler and workers reachable, and a one-token generation succeeds in time."""
        problem = self.engine.engine_problem()
        if problem is not None:
            return _json_response(503, {"status": "unavailable", "reason": problem})
        probe = m.AddRequest(request_id=f"ready-{uuid.uuid4().hex}", prompt_token_ids=[0],
                             sampling=m.SamplingParams(max_tokens=1, temperature=0.0), arrival_time=time.time(),
                             tenant="loomserve-readiness")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.ready_timeout_s):
                async for _ in self.engine.generate(probe):
                    pass
        except TimeoutError:
            return _json_response(503, {"status": "unavailable",
                                        "reason": f"no token within {self.config.ready_timeout_s} s"})
        except EngineError as e:
            return _json_response(503, {"status": "unavailable", "reason": e.error.message})
        return _json_response(200, {"status": "ready", "generation_ms": round((time.monotonic() - started) * 1e3, 1)})

    async def metrics_route(self, request: Request) -> Response:
        if self.engine.status is not None:
            self.metrics.update_from_status(self.engine.status)
        body, content_type = self.metrics.metrics_response()
        return Response(body, media_type=content_type)

    async def reset_prefix_cache(self, request: Request) -> Response:
        principal = _principal(request)
        if principal.tenant != OPEN_TENANT and principal.tenant not in self.admin_tenants:
            raise APIError(403, "this route is for the tenants named by --admin-tenants", type="permission_error")
        reply = await self.engine.reset_prefix_cache()
        if not reply.ok:
            raise APIError(409, f"the prefix cache was not reset: {reply.message}", type="conflict")
        return _json_response(200, {"status": "reset"})

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/completions", self.preparer.completion, CompletionRenderer)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/chat/completions", self.preparer.chat, ChatRenderer)

    async def _handle(self, request: Request, endpoint: str, prepare: Callable[[bytes], PreparedRequest],
                      api: type[Renderer]) -> Response:
        assert self.services is not None
        principal = _principal(request)
        span = self.tracer.start_span(f"POST {endpoint}", kind=SpanKind.SERVER,
                                      attributes={"loomserve.tenant": principal.tenant})
        life = RequestLifecycle(endpoint, principal, span, self.metrics, self.services.limiter)
        try:
            raw = await self._read_body(request)
            with trace.use_span(span, end_on_exit=False):
                with self.tracer.start_as_current_span("tokenize"):
                    prep = prepare(raw)
                life.prompt_tokens = sum(len(p) for p in prep.prompts)
                span.set_attributes({"loomserve.request_id": prep.response_id, "loomserve.n": prep.n,
                                     "loomserve.stream": prep.stream,
                                     "loomserve.max_tokens": prep.sampling.max_tokens,
                                     "loomserve.prompt_tokens": life.prompt_tokens})
                with self.tracer.start_as_current_span("rate_limit"):
                    reserve = life.prompt_tokens + prep.num_choices * prep.sampling.max_tokens
                    try:
                        life.admission = await self.services.limiter.admit(principal, reserve)
                    except RateLimitExceeded as e:
                        self.metrics.observe_rate_limit_rejection(principal.tenant, e.type)
                        raise
                cached = await self._cache_lookup(life, prep, api, raw)
            renderer = self._renderer(api, prep)
            headers = {"x-request-id": prep.response_id, **life.admission.headers}
            if cached is not None:
                await life.finish(200)
                return self._replay(prep, renderer, cached, headers)
            response = await self._serve(request, prep, renderer, life, headers)
        except APIError as e:
            await life.finish(e.status, e.message)
            raise
        except EngineError as e:
            await life.finish(e.error.status, e.error.message)
            raise
        except BaseException as e:
            await life.finish(500, f"{type(e).__name__}: {e}")
            raise
        return response

    def _renderer(self, api: type[Renderer], prep: PreparedRequest) -> Renderer:
        token_text = None
        if prep.want_logprobs:
            token_text = self.token_id_text if prep.tokens_as_ids else self.token_text
        return api(prep.response_id, self.model.name, return_token_ids=prep.return_token_ids, token_text=token_text)

    async def _cache_lookup(self, life: RequestLifecycle, prep: PreparedRequest, api: type[Renderer],
                            raw: bytes) -> CachedResponse | None:
        cache = self.services.cache if self.services else None
        if cache is None:
            return None
        with self.tracer.start_as_current_span("cache_lookup") as span:
            key = cache_key(life.principal.tenant, self.model.name, self.model.revision, life.endpoint,
                            json.loads(raw), self.model.sampling_defaults.values)
            if key is None:
                span.set_attribute("loomserve.cache", "not_cacheable")
                return None
            cached = await cache.get(key)
            self.metrics.observe_cache_lookup(cached is not None)
            span.set_attribute("loomserve.cache", "hit" if cached is not None else "miss")
            if cached is None:
                life.cache, life.cache_key = cache, key
                life.recorder = ResponseRecorder(api.kind, prep.num_choices)
            return cached

    def _replay(self, prep: PreparedRequest, renderer: Renderer, cached: CachedResponse,
                headers: dict[str, str]) -> Response:
        headers = {**headers, CACHE_HEADER: CACHE_HIT}
        if prep.stream:
            return SSEResponse(_aiter(renderer.replay_events(cached, include_usage=prep.include_usage)), headers)
        return _json_response(200, renderer.replay_body(cached), headers)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _max_model_len(self) -> int:
        status = self.engine.status
        problem = self.engine.engine_problem()
        if problem is not None or status is None:
            raise APIError(503, f"the engine is not ready: {problem}", type="engine_unavailable",
                           headers={"retry-after": "5"})
        return status.max_model_len

    # -- running -------------------------------------------------------------

    async def _serve(self, request: Request, prep: PreparedRequest, renderer: Renderer, life: RequestLifecycle,
                     headers: dict[str, str]) -> Response:
        if prep.stream:
            # The response starts only once the engine took the request and produced
            # a first delta, so a refusal (queue full, context too long) is a plain
            # HTTP error with its status and headers, not an event in a 200 stream.
            deltas = self._generate(prep, life)
            try:
                first = await race_disconnect(request.receive, anext(deltas))
            except ClientDisconnected:
                await deltas.aclose()
                await life.finish(499, "client disconnected")
                return Response(status_code=499)
            except BaseException:
                await deltas.aclose()
                raise
            return SSEResponse(self._stream(prep, renderer, life, first, deltas), headers)
        try:
            results = await race_disconnect(request.receive, self._collect(prep, renderer, life))
        except ClientDisconnected:
            await life.finish(499, "client disconnected")
            return Response(status_code=499)
        body = renderer.results_body(results, self._usage(prep, sum(len(r.token_ids) for r in results)))
        await life.finish(200)
        return _json_response(200, body, headers)

    def _trace_context(self, life: RequestLifecycle, prompt_index: int) -> str | None:
        """A child span per engine request; its traceparent rides inside AddRequest."""
        with self.tracer.start_as_current_span("generate", context=trace.set_span_in_context(life.span),
                                               attributes={"loomserve.prompt": prompt_index}) as span:
            return inject_traceparent(span)

    def _generate(self, prep: PreparedRequest, life: RequestLifecycle) -> AsyncGenerator[ChoiceDelta, None]:
        """Deltas of every choice, as they come."""
        engine_requests = prep.engine_requests(life.principal.tenant, lambda p: self._trace_context(life, p))
        return merged_choices(self.engine, self.model.tokenizer, prep, engine_requests, life.on_tokens)

    async def _collect(self, prep: PreparedRequest, renderer: Renderer,
                       life: RequestLifecycle) -> list[ChoiceResult]:
        results = [ChoiceResult(i) for i in range(prep.num_choices)]
        async for delta in self._generate(prep, life):
            r = results[delta.index]
            r.text += delta.text
            r.token_ids += delta.token_ids
            r.logprobs += delta.logprobs
            life.record(delta.index, delta.text, delta.token_ids, renderer.logprobs(delta.logprobs, delta.token_ids),
                        delta.finish_reason)
            if delta.finish_reason is not None:
                r.finish_reason = delta.finish_reason
        return results

    def _usage(self, prep: PreparedRequest, completion_tokens: int) -> dict[str, int]:
        return usage(sum(len(p) for p in prep.prompts), completion_tokens)

    async def _stream(self, prep: PreparedRequest, renderer: Renderer, life: RequestLifecycle, first: ChoiceDelta,
                      rest: AsyncGenerator[ChoiceDelta, None]) -> AsyncIterator[bytes]:
        status, error = 499, "client disconnected"  # unless the stream ends by itself
        # A delta with no text and no finish shows the client nothing, unless it asked for every token.
        send_every_delta = prep.want_logprobs or prep.return_token_ids
        try:
            for event in renderer.start_stream(prep.num_choices):
                yield event
            try:
                async for delta in _chain(first, rest):
                    lps = renderer.logprobs(delta.logprobs, delta.token_ids)
                    life.record(delta.index, delta.text, delta.token_ids, lps, delta.finish_reason)
                    if not delta.text and delta.finish_reason is None and not send_every_delta:
                        continue
                    yield renderer.chunk(delta.index, delta.text, delta.token_ids, lps, delta.finish_reason)
            except EngineError as e:
                status, error = e.error.status, e.error.message
                yield error_event(e.error)
                yield DONE
                return
            if prep.include_usage:
                yield renderer.usage_chunk(self._usage(prep, life.completion_tokens))
            yield DONE
            status, error = 200, ""
        finally:
            await life.finish(status, error or None)


async def _aiter(events: Iterable[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _principal(request: Request) -> Principal:
    """Set by AuthMiddleware on every non-public route."""
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        raise APIError(401, "missing API key", type="authentication_error", code="missing_api_key")
    return principal


async def _chain(first: ChoiceDelta, rest: AsyncGenerator[ChoiceDelta, None]) -> AsyncIterator[ChoiceDelta]:
    try:
        yield first
        async for delta in rest:
            yield delta
    finally:
        await rest.aclose()


def _error_handlers() -> dict[Any, Callable[..., Any]]:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _json_response(exc.status, exc.body(), exc.headers)

    async def engine_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError)
        error = exc.error
        headers = {} if error.retry_after_s is None else {"retry-after": str(math.ceil(error.retry_after_s))}
        return _json_response(error.status, APIError(error.status, error.message, type=error.type).body(), headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json_response(exc.status_code, APIError(exc.status_code, exc.detail).body())

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _json_response(500, APIError(500, "internal error; the server log has details",
                                            type="internal_error").body())

    return {APIError: api_error, EngineError: engine_error, HTTPException: http_error,
            Exception: unexpected}


def create_app(config: GatewayConfig, engine: EngineClient, model: ModelInfo, keys: KeyStore) -> Starlette:
    gateway = Gateway(config, engine, model, keys)
    routes = [
        Route("/health", gateway.health, methods=["GET"]),
        Route("/ready", gateway.ready, methods=["GET"]),
        Route("/metrics", gateway.metrics_route, methods=["GET"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/admin/reset_prefix_cache", gateway.reset_prefix_cache, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    public = {"/health", "/ready"} | ({"/metrics"} if config.public_metrics else set())
    app = Starlette(routes=routes, exception_handlers=_error_handlers(), lifespan=lifespan,
                    middleware=[Middleware(AuthMiddleware, keys=keys, public_paths=public)])
    app.state.gateway = gateway
    return app
