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
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import PreTrainedTokenizerBase

from loomserve.gateway.asgi import ClientDisconnected, SSEResponse, race_disconnect
from loomserve.gateway.auth import OPEN_TENANT, AuthMiddleware, KeyStore, Principal
from loomserve.gateway.engine_client import EngineClient, EngineError
from loomserve.gateway.generation import (
    ChoiceDelta,
    ChoiceResult,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    generate_choices,
)
from loomserve.gateway.lifecycle import RequestLifecycle
from loomserve.gateway.limits import Limits
from loomserve.gateway.metrics import GatewayMetrics
from loomserve.gateway.protocol import (
    MAX_TOP_LOGPROBS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    decode_body,
    stop_strings,
    validate_roles,
    validate_sampling,
)
from loomserve.gateway.ratelimit import LocalRateLimiter, RateLimiter, RateLimitExceeded, RedisRateLimiter
from loomserve.gateway.response_cache import (
    CACHE_HEADER,
    CACHE_HIT,
    CachedResponse,
    ResponseCache,
    ResponseRecorder,
    cache_key,
    replay_json,
    replay_sse,
)
from loomserve.gateway.sampling_defaults import SamplingDefaults
from loomserve.gateway.tokenizer import apply_chat_template
from loomserve.shared import messages as m
from loomserve.shared.config import GatewayConfig
from loomserve.shared.tracing import get_tracer, inject_traceparent

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    revision: str  # changes when the weights change; part of the response-cache key
    sampling_defaults: SamplingDefaults  # for the sampling fields a request leaves out


@dataclass
class PreparedRequest:
    """A validated request, ready to fan out into engine requests."""

    kind: str  # "completion" | "chat"
    response_id: str
    prompts: list[list[int]]
    n: int
    sampling: m.SamplingParams  # choice i of a seeded request samples with seed + i (the scheduler's doing)
    stop: list[str]
    skip_special_tokens: bool
    stream: bool
    include_usage: bool
    want_logprobs: bool
    priority: int
    return_token_ids: bool
    tokens_as_ids: bool
    queue_timeout_s: float | None


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def build_limiter(config: GatewayConfig) -> RateLimiter:
    """The gateway's rate limiter: in Redis (shared by replicas) when ``config.redis_url`` is
    set, else in this process's memory."""
    c = config
    defaults = Limits(c.rate_limit_rpm, c.rate_limit_tpm, c.rate_limit_request_burst, c.rate_limit_token_burst)
    if not c.redis_url:
        return LocalRateLimiter(defaults)
    return RedisRateLimiter(
        c.redis_url, defaults,
        requests_on_failure=c.rate_limit_requests_on_failure,  # type: ignore[arg-type]
        tokens_on_failure=c.rate_limit_tokens_on_failure,  # type: ignore[arg-type]
        timeout_s=c.rate_limit_timeout_ms / 1000.0)


@dataclass
class Services:
    """What the gateway talks to besides the engine; built inside the event loop
    (redis.asyncio binds its connections to the loop that opens them)."""

    limiter: RateLimiter
    cache: ResponseCache | None


class Gateway:
    def __init__(self, config: GatewayConfig, engine: EngineClient, model: ModelInfo) -> None:
        self.config = config
        self.engine = engine
        self.model = model
        self.token_text = TokenText(model.tokenizer)
        self.token_id_text = TokenText(model.tokenizer, as_ids=True)
        self.metrics = GatewayMetrics(config.price_per_1m_input_usd, config.price_per_1m_output_usd)
        self.services: Services | None = None
        self.tracer = get_tracer("loomserve.gateway")
        self.admin_tenants = {t.strip() for t in config.admin_tenants.split(",") if t.strip()}

    async def start(self) -> None:
        c = self.config
        limiter = build_limiter(c)
        if isinstance(limiter, RedisRateLimiter):
            await limiter.prepare()
        cache = None
        if c.response_cache:
            cache = ResponseCache(c.redis_url, ttl_s=c.response_cache_ttl_s,
                                  max_entry_bytes=c.response_cache_max_entry_bytes,
                                  on_error=self.metrics.observe_cache_error)
        self.services = Services(limiter, cache)
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.close()
        if self.services is not None:
            await self.services.limiter.aclose()
            if self.services.cache is not None:
                await self.services.cache.close()

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
        return await self._handle(request, "/v1/completions", CompletionRequest, self._prepare_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/chat/completions", ChatCompletionRequest, self._prepare_chat)

    async def _handle(self, request: Request, endpoint: str, body_type: type[Any],
                      prepare: Callable[[Any], PreparedRequest]) -> Response:
        assert self.services is not None
        principal = _principal(request)
        span = self.tracer.start_span(f"POST {endpoint}", kind=SpanKind.SERVER,
                                      attributes={"loomserve.tenant": principal.tenant})
        life = RequestLifecycle(endpoint, principal, span, self.metrics, self.services.limiter)
        try:
            raw = await self._read_body(request)
            with trace.use_span(span, end_on_exit=False):
                with self.tracer.start_as_current_span("tokenize"):
                    prep = prepare(decode_body(raw, body_type))
                life.prompt_tokens = sum(len(p) for p in prep.prompts)
                span.set_attributes({"loomserve.request_id": prep.response_id, "loomserve.n": prep.n,
                                     "loomserve.stream": prep.stream,
                                     "loomserve.max_tokens": prep.sampling.max_tokens,
                                     "loomserve.prompt_tokens": life.prompt_tokens})
                with self.tracer.start_as_current_span("rate_limit"):
                    reserve = life.prompt_tokens + len(prep.prompts) * prep.n * prep.sampling.max_tokens
                    try:
                        life.admission = await self.services.limiter.admit(principal, reserve)
                    except RateLimitExceeded as e:
                        self.metrics.observe_rate_limit_rejection(principal.tenant, e.type)
                        raise
                cached = await self._cache_lookup(life, prep, raw)
            headers = {"x-request-id": prep.response_id, **life.admission.headers}
            if cached is not None:
                await life.finish(200)
                return self._replay(prep, cached, headers)
            response = await self._serve(request, prep, life, headers)
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

    async def _cache_lookup(self, life: RequestLifecycle, prep: PreparedRequest, raw: bytes) -> CachedResponse | None:
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
                life.recorder = ResponseRecorder("chat" if prep.kind == "chat" else "completion",
                                                 len(prep.prompts) * prep.n)
            return cached

    def _replay(self, prep: PreparedRequest, cached: CachedResponse, headers: dict[str, str]) -> Response:
        headers = {**headers, CACHE_HEADER: CACHE_HIT}
        if prep.stream:
            events = replay_sse(cached, response_id=prep.response_id, model=self.model.name,
                                include_usage=prep.include_usage, return_token_ids=prep.return_token_ids)
            return SSEResponse(_aiter(events), headers)
        body = replay_json(cached, response_id=prep.response_id, model=self.model.name,
                           return_token_ids=prep.return_token_ids)
        return _json_response(200, body, headers)

    # -- request preparation -------------------------------------------------

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

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model.name!r}", param="model", code="model_not_found")

    def _max_model_len(self) -> int:
        status = self.engine.status
        problem = self.engine.engine_problem()
        if problem is not None or status is None:
            raise APIError(503, f"the engine is not ready: {problem}", type="engine_unavailable",
                           headers={"retry-after": "5"})
        return status.max_model_len

    def _tokenize_prompt(self, prompt: str | list[str | int | list[int]]) -> list[list[int]]:
        vocab = len(self.model.tokenizer)
        items: list[str | int | list[int]] = [prompt] if isinstance(prompt, str) else prompt
        prompts: list[list[int]] = []
        if items and all(isinstance(p, int) for p in items):
            prompts = [[p for p in items if isinstance(p, int)]]
        elif items and all(isinstance(p, str) for p in items):
            prompts = [self.model.tokenizer.encode(p, add_special_tokens=True) for p in items if isinstance(p, str)]
        elif items and all(isinstance(p, list) for p in items):
            prompts = [list(p) for p in items if isinstance(p, list)]
        else:
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids "
                                "or a list of lists of token ids, and not empty", param="prompt")
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is out of range for a vocabulary of {vocab}",
                               param="prompt")
        return prompts

    def _sampling(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                  logprobs: int | None) -> m.SamplingParams:
        eos = [] if req.ignore_eos else self.model.eos_token_ids
        bias = {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None
        vocab = len(self.model.tokenizer)
        if bias and any(not 0 <= k < vocab for k in bias):
            raise APIError(400, f"logit_bias has a token id outside the vocabulary of {vocab}",
                           param="logit_bias")
        default = self.model.sampling_defaults.values
        top_k = int(default["top_k"]) if req.top_k is None else req.top_k
        return m.SamplingParams(
            max_tokens=max_tokens,
            temperature=default["temperature"] if req.temperature is None else req.temperature,
            top_p=default["top_p"] if req.top_p is None else req.top_p,
            top_k=max(top_k, 0),
            min_p=default["min_p"] if req.min_p is None else req.min_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=default["repetition_penalty"] if req.repetition_penalty is None
            else req.repetition_penalty,
            logit_bias=bias,
            logprobs=logprobs,
            stop_token_ids=sorted(set(eos) | set(req.stop_token_ids or [])),
            min_tokens=req.min_tokens,
        )

    def _finish_prepare(self, kind: str, req: CompletionRequest | ChatCompletionRequest,
                        prompts: list[list[int]], max_tokens: int | None, default_max: int | None,
                        logprobs: int | None) -> PreparedRequest:
        max_model_len = self._max_model_len()
        longest = max(len(p) for p in prompts)
        if longest >= max_model_len:
            raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, "
                                f"but the prompt has {longest} tokens", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = max_model_len - longest if default_max is None else default_max
            max_tokens = min(max_tokens, max_model_len - longest)
        elif longest + max_tokens > max_model_len:
            raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, "
                                f"but {longest} prompt tokens + {max_tokens} max_tokens = "
                                f"{longest + max_tokens}; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return PreparedRequest(
            kind=kind,
            response_id=f"{prefix}-{uuid.uuid4().hex}",
            prompts=prompts,
            n=req.n,
            sampling=self._sampling(req, max_tokens, logprobs),
            stop=stop_strings(req),
            skip_special_tokens=req.skip_special_tokens,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            want_logprobs=logprobs is not None,
            priority=req.priority,
            return_token_ids=req.return_token_ids,
            tokens_as_ids=req.return_tokens_as_token_ids,
            queue_timeout_s=req.queue_timeout,
        )

    def _prepare_completion(self, req: CompletionRequest) -> PreparedRequest:
        self._check_model(req.model)
        validate_sampling(req, req.max_tokens)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
        prompts = self._tokenize_prompt(req.prompt)
        return self._finish_prepare("completion", req, prompts, req.max_tokens,
                                    COMPLETIONS_DEFAULT_MAX_TOKENS, req.logprobs)

    def _prepare_chat(self, req: ChatCompletionRequest) -> PreparedRequest:
        self._check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        validate_sampling(req, max_tokens)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        validate_roles(req.messages)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
                           param="top_logprobs")
        messages = []
        for msg in req.messages:
            content = msg.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, "only text content parts are supported", param="messages")
                    parts.append(part["text"])
                content = "".join(parts)
            messages.append({"role": msg.role, "content": content or ""})
        try:
            prompt = apply_chat_template(self.model.tokenizer, messages,
                                         add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # the template raises on conversations it does not accept
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from e
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._finish_prepare("chat", req, [prompt], max_tokens, None, logprobs)

    # -- running -------------------------------------------------------------

    async def _serve(self, request: Request, prep: PreparedRequest, life: RequestLifecycle,
                     headers: dict[str, str]) -> Response:
        if prep.stream:
            # The response starts only once the engine took the request and produced
            # a first delta, so a refusal (queue full, context too long) is a plain
            # HTTP error with its status and headers, not an event in a 200 stream.
            deltas = self._merged(prep, life)
            try:
                first = await race_disconnect(request.receive, anext(deltas))
            except ClientDisconnected:
                await deltas.aclose()
                await life.finish(499, "client disconnected")
                return Response(status_code=499)
            except BaseException:
                await deltas.aclose()
                raise
            return SSEResponse(self._stream(prep, life, first, deltas), headers)
        try:
            results = await race_disconnect(request.receive, self._collect(prep, life))
        except ClientDisconnected:
            await life.finish(499, "client disconnected")
            return Response(status_code=499)
        body = self._full_response(prep, results)
        await life.finish(200)
        return _json_response(200, body, headers)

    def _trace_context(self, life: RequestLifecycle, prompt_index: int) -> str | None:
        """A child span per engine request; its traceparent rides inside AddRequest."""
        with self.tracer.start_as_current_span("generate", context=trace.set_span_in_context(life.span),
                                               attributes={"loomserve.prompt": prompt_index}) as span:
            return inject_traceparent(span)

    def _engine_requests(self, prep: PreparedRequest, life: RequestLifecycle) -> list[tuple[int, m.AddRequest]]:
        """One engine request per prompt, with the index of its first choice (prompt p has
        choices p * n .. p * n + n - 1)."""
        now = time.time()
        return [(p * prep.n, m.AddRequest(
            request_id=f"{prep.response_id}-{p}",
            prompt_token_ids=prompt,
            sampling=prep.sampling,
            arrival_time=now,
            priority=prep.priority,
            tenant=life.principal.tenant,
            traceparent=self._trace_context(life, p),
            queue_timeout_s=prep.queue_timeout_s,
            n=prep.n,
        )) for p, prompt in enumerate(prep.prompts)]

    async def _merged(self, prep: PreparedRequest, life: RequestLifecycle) -> AsyncGenerator[ChoiceDelta, None]:
        """Deltas of every choice, as they come."""
        queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()
        engine_requests = self._engine_requests(prep, life)

        async def run(first_index: int, add: m.AddRequest) -> None:
            try:
                async for delta in generate_choices(self.engine, self.model.tokenizer, add, first_index, prep.stop,
                                                    prep.skip_special_tokens, prep.kind == "completion"):
                    queue.put_nowait(delta)
            except Exception as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(run(i, add)) for i, add in engine_requests]
        remaining = len(prep.prompts) * prep.n  # choices not ended yet
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                life.on_tokens(len(item.token_ids))
                yield item
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _collect(self, prep: PreparedRequest, life: RequestLifecycle) -> list[ChoiceResult]:
        results = [ChoiceResult(i) for i in range(len(prep.prompts) * prep.n)]
        async for delta in self._merged(prep, life):
            r = results[delta.index]
            r.text += delta.text
            r.token_ids += delta.token_ids
            r.logprobs += delta.logprobs
            life.record(delta.index, delta.text, delta.token_ids,
                        self._logprobs_field(prep, delta.logprobs, delta.token_ids), delta.finish_reason)
            if delta.finish_reason is not None:
                r.finish_reason = delta.finish_reason
        return results

    def _usage(self, prep: PreparedRequest, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prep.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _logprobs_field(self, prep: PreparedRequest, lps: list[m.TokenLogprobs],
                        token_ids: list[int]) -> dict[str, Any] | None:
        if not prep.want_logprobs:
            return None
        token_text = self.token_id_text if prep.tokens_as_ids else self.token_text
        if prep.kind == "chat":
            return chat_logprobs(lps, token_ids, token_text)
        return completion_logprobs(lps, token_ids, token_text)

    def _full_response(self, prep: PreparedRequest, results: list[ChoiceResult]) -> dict[str, Any]:
        choices = []
        for r in results:
            lps = self._logprobs_field(prep, r.logprobs, r.token_ids)
            choice: dict[str, Any]
            if prep.kind == "chat":
                choice = {"index": r.index, "message": {"role": "assistant", "content": r.text},
                          "logprobs": lps, "finish_reason": r.finish_reason}
            else:
                choice = {"index": r.index, "text": r.text, "logprobs": lps,
                          "finish_reason": r.finish_reason}
            if prep.return_token_ids:
                choice["token_ids"] = r.token_ids
            choices.append(choice)
        return {
            "id": prep.response_id,
            "object": "chat.completion" if prep.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model.name,
            "choices": choices,
            "usage": self._usage(prep, sum(len(r.token_ids) for r in results)),
        }

    async def _stream(self, prep: PreparedRequest, life: RequestLifecycle, first: ChoiceDelta,
                      rest: AsyncGenerator[ChoiceDelta, None]) -> AsyncIterator[bytes]:
        created = int(time.time())
        kind = "chat.completion.chunk" if prep.kind == "chat" else "text_completion"
        base = {"id": prep.response_id, "object": kind, "created": created, "model": self.model.name}
        status, error = 499, "client disconnected"  # unless the stream ends by itself
        try:
            if prep.kind == "chat":
                for i in range(len(prep.prompts) * prep.n):
                    yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            try:
                async for delta in _chain(first, rest):
                    lps = self._logprobs_field(prep, delta.logprobs, delta.token_ids)
                    life.record(delta.index, delta.text, delta.token_ids, lps, delta.finish_reason)
                    if (not delta.text and delta.finish_reason is None and not prep.want_logprobs
                            and not prep.return_token_ids):
                        continue
                    choice: dict[str, Any] = {"index": delta.index}
                    if prep.kind == "chat":
                        choice["delta"] = {"content": delta.text} if delta.text else {}
                    else:
                        choice["text"] = delta.text
                    choice["logprobs"] = lps
                    choice["finish_reason"] = delta.finish_reason
                    if prep.return_token_ids:
                        choice["token_ids"] = delta.token_ids
                    yield _sse({**base, "choices": [choice]})
            except EngineError as e:
                status, error = e.error.status, e.error.message
                yield _sse({"error": {"message": e.error.message, "type": e.error.type, "param": None,
                                      "code": e.error.status}})
                yield _DONE
                return
            if prep.include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage(prep, life.completion_tokens)})
            yield _DONE
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
    gateway = Gateway(config, engine, model)
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
