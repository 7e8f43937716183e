"""What happens around one API request besides generating it.

    arrive ─ auth (middleware) ─ tokenize ─ rate limit: reserve prompt + n * max_tokens
       ─ response cache lookup ─┬─ hit: replay, settle 0 generated tokens
                                └─ miss: engine ... first token ... last token
    end (exactly once, also on error, abort or client disconnect):
       settle the reservation with the tokens really used, store a finished answer
       in the response cache, record metrics and cost, end the trace span

``RequestLifecycle.finish`` is idempotent, so every exit path may call it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from loomserve.gateway.auth import Principal
from loomserve.gateway.metrics import GatewayMetrics, time_per_output_token
from loomserve.gateway.ratelimit import Admission, RateLimiter
from loomserve.gateway.response_cache import ResponseCache, ResponseRecorder

log = logging.getLogger(__name__)


@dataclass
class RequestLifecycle:
    endpoint: str
    principal: Principal
    span: Span
    metrics: GatewayMetrics
    limiter: RateLimiter
    started: float = field(default_factory=time.monotonic)
    admission: Admission | None = None
    cache: ResponseCache | None = None
    cache_key: str | None = None
    recorder: ResponseRecorder | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    _finished: bool = False

    def on_tokens(self, count: int) -> None:
        if count and self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.span.add_event("first_token")
        self.completion_tokens += count

    def record(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
               finish_reason: str | None) -> None:
        if self.recorder is not None:
            self.recorder.add(index, text, token_ids, logprobs, finish_reason)

    async def finish(self, status: int, error: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            # Shielded: a cancelled (disconnected) request must still give its tokens back.
            await asyncio.shield(self._settle_and_store(status))
        finally:
            self._observe(status, error)

    async def _settle_and_store(self, status: int) -> None:
        if self.admission is not None:
            await self.limiter.settle(self.admission, self.prompt_tokens + self.completion_tokens)
        if status == 200 and self.cache is not None and self.cache_key is not None and self.recorder is not None:
            answer = self.recorder.result(self.prompt_tokens, self.completion_tokens)
            if answer is not None:
                await self.cache.put(self.cache_key, answer)

    def _observe(self, status: int, error: str | None) -> None:
        now = time.monotonic()
        e2e = now - self.started
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        tpot = None if ttft is None else time_per_output_token(ttft, e2e, self.completion_tokens)
        self.metrics.observe_request(self.endpoint, status, e2e_s=e2e, ttft_s=ttft, tpot_s=tpot)
        if status == 200:
            self.metrics.observe_tokens(self.principal.tenant, self.prompt_tokens, self.completion_tokens)
        self.span.set_attribute("http.response.status_code", status)
        self.span.set_attribute("loomserve.usage.prompt_tokens", self.prompt_tokens)
        self.span.set_attribute("loomserve.usage.completion_tokens", self.completion_tokens)
        if error is not None or status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, error or f"status {status}"))
        self.span.end()
