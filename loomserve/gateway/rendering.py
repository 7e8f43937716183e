"""Rendering answers: one renderer per API, behind one interface.

A ``Renderer`` shapes the answer to one request of its API, live or replayed from
the response cache: the whole JSON body, the SSE chunks, the ``logprobs`` objects
and the usage. The route picks the renderer class once per request, so the
per-token path pays one method call, never a test of which API it serves.

| piece              | /v1/completions (``CompletionRenderer``) | /v1/chat/completions (``ChatRenderer``)   |
|--------------------|------------------------------------------|-------------------------------------------|
| body ``object``    | ``text_completion``                      | ``chat.completion``                       |
| chunk ``object``   | ``text_completion``                      | ``chat.completion.chunk``                 |
| choice text        | ``"text": ...``                          | ``"message": {"role": "assistant", ...}`` |
| chunk text         | ``"text": ...``                          | ``"delta": {"content": ...}`` ({} if none)|
| stream opens with  | nothing                                  | one ``{"role": "assistant"}`` per choice  |
| ``logprobs``       | tokens, token_logprobs, top_logprobs,    | ``{"content": [{token, logprob, bytes,    |
|                    | text_offset                              | top_logprobs}]}``                         |
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from loomserve.gateway.generation import ChoiceResult
from loomserve.gateway.response_cache import CachedPiece, CachedResponse, Kind
from loomserve.shared import messages as m

DONE = b"data: [DONE]\n\n"

# JSON has no -Infinity; a masked token's logprob is shown as this (as OpenAI does).
_MIN_LOGPROB = -9999.0


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_event(error: m.ErrorInfo) -> bytes:
    """How a stream that already began reports a failure (then ``DONE``), for either API."""
    return sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.status}})


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token id -> the text the API shows for it in logprobs (cached per id), or
    ``token_id:N`` when the client asked for ids (tokens whose text is ambiguous)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, as_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._as_ids = as_ids

    def __call__(self, token_id: int) -> str:
        if self._as_ids:
            return f"token_id:{token_id}"
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = str(self._tokenizer.decode([token_id]))
        return cached


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _text_offsets(tokens: list[str]) -> list[int]:
    offsets = []
    offset = 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return offsets


def completion_logprobs(result_logprobs: list[m.TokenLogprobs], token_ids: list[int],
                        token_text: TokenText) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object."""
    tokens = [token_text(t) for t in token_ids]
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(lp.logprob) for lp in result_logprobs],
        "top_logprobs": [
            {token_text(t): _finite(v) for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)}
            for lp in result_logprobs
        ],
        "text_offset": _text_offsets(tokens),
    }


def chat_logprobs(result_logprobs: list[m.TokenLogprobs], token_ids: list[int],
                  token_text: TokenText) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for token_id, lp in zip(token_ids, result_logprobs, strict=True):
        text = token_text(token_id)
        content.append({
            "token": text,
            "logprob": _finite(lp.logprob),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": token_text(t), "logprob": _finite(v), "bytes": list(token_text(t).encode("utf-8"))}
                for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)
            ],
        })
    return {"content": content}


class Renderer(ABC):
    """The answer to one request of one API, as a JSON body or as SSE events.

    ``token_text`` names tokens in ``logprobs`` objects; None when the request asked for
    no logprobs. ``clock`` gives ``created`` (Unix seconds), read when a body is built or
    a stream starts. A stream calls ``start_stream`` once, then ``chunk`` per piece.
    """

    kind: ClassVar[Kind]  # the response cache's name for the API
    body_object: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, response_id: str, model: str, *, return_token_ids: bool = False,
                 token_text: TokenText | None = None, clock: Callable[[], float] = time.time) -> None:
        self.response_id = response_id
        self.model = model
        self.return_token_ids = return_token_ids
        self._token_text = token_text
        self._clock = clock
        self._chunk_base: dict[str, Any] = {}  # id, object, created, model of every chunk; set by start_stream

    # -- per token -----------------------------------------------------------

    @abstractmethod
    def logprobs(self, lps: list[m.TokenLogprobs], token_ids: list[int]) -> dict[str, Any] | None:
        """The ``logprobs`` object of these tokens, None when the request asked for none."""

    @abstractmethod
    def chunk(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
              finish_reason: str | None) -> bytes:
        """The SSE event of one piece of choice ``index``."""

    # -- per choice ----------------------------------------------------------

    @abstractmethod
    def choice(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
               finish_reason: str | None) -> dict[str, Any]:
        """A whole choice, as the JSON body lists it."""

    @abstractmethod
    def merge_logprobs(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One choice's ``logprobs`` object from the objects of its pieces, in order."""

    def opening_chunks(self, num_choices: int) -> list[bytes]:
        """The events a stream starts with, before any content."""
        return []

    # -- whole answers ---------------------------------------------------------

    def body(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.response_id, "object": self.body_object, "created": int(self._clock()),
                "model": self.model, "choices": choices, "usage": usage}

    def results_body(self, results: list[ChoiceResult], usage: dict[str, int]) -> dict[str, Any]:
        """The JSON body of choices generated just now."""
        return self.body([self.choice(r.index, r.text, r.token_ids, self.logprobs(r.logprobs, r.token_ids),
                                      r.finish_reason) for r in results], usage)

    def start_stream(self, num_choices: int) -> list[bytes]:
        """Fixes the stream's ``created`` and returns its opening events."""
        self._chunk_base = {"id": self.response_id, "object": self.chunk_object, "created": int(self._clock()),
                            "model": self.model}
        return self.opening_chunks(num_choices)

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        return sse({**self._chunk_base, "choices": [], "usage": usage})

    # -- answers from the response cache --------------------------------------

    def replay_body(self, cached: CachedResponse) -> dict[str, Any]:
        """The non-streamed body of a cached answer."""
        return self.body([self.choice(index, c.text, c.token_ids, self._merged_logprobs(c.pieces), c.finish_reason)
                          for index, c in enumerate(cached.choices)], cached.usage())

    def replay_events(self, cached: CachedResponse, include_usage: bool = False) -> Iterator[bytes]:
        """The SSE events (ending with ``data: [DONE]``) of a cached answer, one chunk per stored
        piece, choice after choice; a usage chunk last when ``include_usage``."""
        yield from self.start_stream(len(cached.choices))
        for index, c in enumerate(cached.choices):
            # A choice always ends with a chunk carrying its finish reason, even one that stored no piece.
            pieces = c.pieces or [CachedPiece("")]
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                # As the live stream does: a piece that would show the client nothing is not sent.
                if not last and not piece.text and piece.logprobs is None and not self.return_token_ids:
                    continue
                yield self.chunk(index, piece.text, piece.token_ids, piece.logprobs,
                                 c.finish_reason if last else None)
        if include_usage:
            yield self.usage_chunk(cached.usage())
        yield DONE

    def _merged_logprobs(self, pieces: list[CachedPiece]) -> dict[str, Any] | None:
        parts = [p.logprobs for p in pieces if p.logprobs is not None]
        return self.merge_logprobs(parts) if parts else None


class CompletionRenderer(Renderer):
    kind = "completion"
    body_object = "text_completion"
    chunk_object = "text_completion"

    def logprobs(self, lps: list[m.TokenLogprobs], token_ids: list[int]) -> dict[str, Any] | None:
        token_text = self._token_text
        return None if token_text is None else completion_logprobs(lps, token_ids, token_text)

    def chunk(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
              finish_reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return sse({**self._chunk_base, "choices": [choice]})

    def choice(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
               finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def merge_logprobs(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = [t for part in parts for t in part.get("tokens", [])]
        return {
            "tokens": tokens,
            "token_logprobs": [v for part in parts for v in part.get("token_logprobs", [])],
            "top_logprobs": [v for part in parts for v in part.get("top_logprobs", [])],
            # Offsets count characters from the start of the choice's text, so they are recomputed
            # over the whole choice rather than carried over from pieces that each started at 0.
            "text_offset": _text_offsets(tokens),
        }


class ChatRenderer(Renderer):
    kind = "chat"
    body_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def logprobs(self, lps: list[m.TokenLogprobs], token_ids: list[int]) -> dict[str, Any] | None:
        token_text = self._token_text
        return None if token_text is None else chat_logprobs(lps, token_ids, token_text)

    def chunk(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
              finish_reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                                  "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return sse({**self._chunk_base, "choices": [choice]})

    def choice(self, index: int, text: str, token_ids: list[int], logprobs: dict[str, Any] | None,
               finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": text},
                                  "logprobs": logprobs, "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def merge_logprobs(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"content": [entry for part in parts for entry in part.get("content") or []]}

    def opening_chunks(self, num_choices: int) -> list[bytes]:
        # The assistant role comes first, once per choice, as OpenAI streams it.
        return [sse({**self._chunk_base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
                for i in range(num_choices)]
