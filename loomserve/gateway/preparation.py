"""Preparing a request: an HTTP body in, validated engine requests out.

    body ─ decode (types) ─ validate (ranges, model, roles) ─ tokenize or apply the
         chat template ─ context-length checks ─ SamplingParams with the model's
         defaults for the fields the body leaves out ─ PreparedRequest

Every refusal is an ``APIError`` (4xx), raised before anything reaches the engine
or the rate limiter; a 503 when the engine cannot say what its context length is.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from loomserve.gateway.model_info import ModelInfo
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
from loomserve.gateway.tokenizer import apply_chat_template
from loomserve.shared import messages as m

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions


@dataclass
class PreparedRequest:
    """A validated request, ready to fan out into engine requests."""

    response_id: str
    prompts: list[list[int]]
    n: int
    sampling: m.SamplingParams  # choice i of a seeded request samples with seed + i (the scheduler's doing)
    stop: list[str]
    skip_special_tokens: bool
    continues_prompt: bool  # the output is appended to the prompt's text (completions), not a new turn (chat)
    stream: bool
    include_usage: bool
    want_logprobs: bool
    priority: int
    return_token_ids: bool
    tokens_as_ids: bool
    queue_timeout_s: float | None

    @property
    def num_choices(self) -> int:
        """Every prompt's ``n`` choices: prompt p has choices p * n .. p * n + n - 1."""
        return len(self.prompts) * self.n

    def engine_requests(self, tenant: str, traceparent: Callable[[int], str | None]) -> list[tuple[int, m.AddRequest]]:
        """One engine request per prompt, with the index of its first choice;
        ``traceparent(p)`` gives the trace context of prompt ``p``."""
        now = time.time()
        return [(p * self.n, m.AddRequest(
            request_id=f"{self.response_id}-{p}",
            prompt_token_ids=prompt,
            sampling=self.sampling,
            arrival_time=now,
            priority=self.priority,
            tenant=tenant,
            traceparent=traceparent(p),
            queue_timeout_s=self.queue_timeout_s,
            n=self.n,
        )) for p, prompt in enumerate(self.prompts)]


class RequestPreparer:
    """Turns the bodies of /v1/completions and /v1/chat/completions into ``PreparedRequest``s.

    ``max_model_len`` returns the engine's context length, or raises APIError (503) while
    the engine cannot say; it is asked only once a body passed every other check.
    """

    def __init__(self, model: ModelInfo, max_model_len: Callable[[], int]) -> None:
        self.model = model
        self._max_model_len = max_model_len

    def completion(self, raw: bytes) -> PreparedRequest:
        req: CompletionRequest = decode_body(raw, CompletionRequest)
        self._check_model(req.model)
        validate_sampling(req, req.max_tokens)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
        prompts = self._tokenize_prompt(req.prompt)
        return self._prepared("cmpl", req, prompts, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, req.logprobs,
                              continues_prompt=True)

    def chat(self, raw: bytes) -> PreparedRequest:
        req: ChatCompletionRequest = decode_body(raw, ChatCompletionRequest)
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
        return self._prepared("chatcmpl", req, [prompt], max_tokens, None, logprobs, continues_prompt=False)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model.name!r}", param="model", code="model_not_found")

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

    def _prepared(self, id_prefix: str, req: CompletionRequest | ChatCompletionRequest,
                  prompts: list[list[int]], max_tokens: int | None, default_max: int | None,
                  logprobs: int | None, *, continues_prompt: bool) -> PreparedRequest:
        """The context-length checks, then the request; ``default_max`` None: up to the context length."""
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
        return PreparedRequest(
            response_id=f"{id_prefix}-{uuid.uuid4().hex}",
            prompts=prompts,
            n=req.n,
            sampling=self._sampling(req, max_tokens, logprobs),
            stop=stop_strings(req),
            skip_special_tokens=req.skip_special_tokens,
            continues_prompt=continues_prompt,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            want_logprobs=logprobs is not None,
            priority=req.priority,
            return_token_ids=req.return_token_ids,
            tokens_as_ids=req.return_tokens_as_token_ids,
            queue_timeout_s=req.queue_timeout,
        )
