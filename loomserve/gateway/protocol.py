"""OpenAI request bodies, their validation, and the error shape.

Bodies are decoded by msgspec into typed Structs, so a wrong type is reported
with the JSON path of the field (``Expected `int`, got `str` - at
`$.max_tokens```). Range checks follow in ``validate()``. Every failure is an
``APIError`` rendered as ``{"error": {"message", "type", "param", "code"}}``.
Unknown fields are ignored, as the OpenAI API does for forward compatibility.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20
# The roles OpenAI's chat API accepts ("function" is its deprecated name for "tool").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    priority: int = 0
    return_token_ids: bool = False  # extension: each choice carries its output token ids
    return_tokens_as_token_ids: bool = False  # extension: logprobs name tokens "token_id:N"
    queue_timeout: float | None = None  # extension: seconds the request may wait before it starts


class CompletionRequest(_SamplingFields, kw_only=True):
    # msgspec allows one array type per union: the list's items are checked when tokenizing.
    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


_PATH_RE = re.compile(r"`\$\.([A-Za-z_]+)")


def decode_body(raw: bytes, cls: type[msgspec.Struct]) -> Any:
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as e:
        match = _PATH_RE.search(str(e))
        raise APIError(400, f"invalid request: {e}", param=match.group(1) if match else None) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8: {e.reason} at byte {e.start}") from None


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise APIError(400, message, param=param)


def _finite(value: float | None, param: str) -> None:
    if value is not None:
        _check(math.isfinite(value), f"{param} must be a finite number", param)


def stop_strings(req: _SamplingFields) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def validate_sampling(req: _SamplingFields, max_tokens: int | None) -> None:
    """Range checks shared by both endpoints; types were checked by decoding."""
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        _finite(getattr(req, name), name)
    if req.temperature is not None:
        _check(0.0 <= req.temperature <= 2.0, "temperature must be between 0 and 2", "temperature")
    if req.top_p is not None:
        _check(0.0 < req.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
    if req.top_k is not None:
        _check(req.top_k == -1 or req.top_k >= 0, "top_k must be -1 (off), 0 (off) or positive", "top_k")
    if req.min_p is not None:
        _check(0.0 <= req.min_p <= 1.0, "min_p must be between 0 and 1", "min_p")
    _check(1 <= req.n <= MAX_N, f"n must be between 1 and {MAX_N}", "n")
    if max_tokens is not None:
        _check(max_tokens >= 1, "max_tokens must be at least 1", "max_tokens")
    _check(req.min_tokens >= 0, "min_tokens must not be negative", "min_tokens")
    if max_tokens is not None:
        _check(req.min_tokens <= max_tokens, "min_tokens must not exceed max_tokens", "min_tokens")
    _check(-2.0 <= req.presence_penalty <= 2.0, "presence_penalty must be between -2 and 2",
           "presence_penalty")
    _check(-2.0 <= req.frequency_penalty <= 2.0, "frequency_penalty must be between -2 and 2",
           "frequency_penalty")
    if req.repetition_penalty is not None:
        _check(0.0 < req.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]",
               "repetition_penalty")
    stops = stop_strings(req)
    _check(len(stops) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings", "stop")
    for s in stops:
        _check(0 < len(s) <= MAX_STOP_LENGTH,
               f"each stop string must have 1 to {MAX_STOP_LENGTH} characters", "stop")
    if req.queue_timeout is not None:
        _check(math.isfinite(req.queue_timeout) and req.queue_timeout > 0, "queue_timeout must be positive seconds",
               "queue_timeout")
    if req.seed is not None:
        _check(-(2**63) <= req.seed < 2**64, "seed must fit in 64 bits", "seed")
    if req.logit_bias:
        for key, bias in req.logit_bias.items():
            _check(key.lstrip("-").isdigit(), f"logit_bias key {key!r} is not a token id", "logit_bias")
            _check(math.isfinite(bias) and -100.0 <= bias <= 100.0,
                   "logit_bias values must be between -100 and 100", "logit_bias")


def validate_roles(messages: list[ChatMessage]) -> None:
    for i, msg in enumerate(messages):
        _check(msg.role in CHAT_ROLES, f"messages[{i}].role is {msg.role!r}; it must be one of "
                                       f"{', '.join(CHAT_ROLES)}", f"messages[{i}].role")
