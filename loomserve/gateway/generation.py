"""Generated choices: token ids from the engine in, text and logprobs out.

Per output token: detokenize incrementally (never half a UTF-8 character),
run the stop-string matcher (cut exactly before a stop string, hold back text
that might start one), and format logprobs. When a stop string is found the
choice is aborted in the scheduler and ends with ``finish_reason`` "stop".
One engine request carries the ``n`` choices of a prompt.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from loomserve.gateway.detokenizer import IncrementalDetokenizer
from loomserve.gateway.engine_client import EngineClient
from loomserve.gateway.stop_strings import StopStringMatcher
from loomserve.shared import messages as m


@dataclass
class ChoiceDelta:
    """What one choice adds in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[m.TokenLogprobs]
    finish_reason: str | None = None


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[m.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


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


class ChoiceDecoder:
    """Token ids of one choice in, its text out: the incremental detokenizer and the
    stop-string matcher. ``continues_prompt``: the text is appended to the prompt
    (completions), so the first token keeps a leading space that a SentencePiece
    decode would strip."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], index: int,
                 stop: list[str], skip_special_tokens: bool, continues_prompt: bool) -> None:
        context = prompt_token_ids if continues_prompt else ()
        self.index = index
        self._detok = IncrementalDetokenizer(tokenizer, context, skip_special_tokens=skip_special_tokens)
        self._matcher = StopStringMatcher(stop) if stop else None

    def feed(self, out: m.RequestOutput) -> ChoiceDelta:
        """The delta of one engine output; ``finish_reason`` "stop" when a stop string ended it."""
        text = self._detok.add_tokens(out.new_token_ids)
        reason = out.finish_reason
        if reason is not None:
            text += self._detok.flush()
        matcher = self._matcher
        if matcher is not None:
            text, hit = matcher.feed(text)
            if hit:
                reason = "stop"
            elif reason is not None:
                text += matcher.flush()
                if matcher.stopped:  # a stop string completed inside the held-back tail
                    reason = "stop"
        return ChoiceDelta(self.index, text, list(out.new_token_ids), list(out.logprobs or []), reason)


async def generate_choices(
    engine: EngineClient,
    tokenizer: PreTrainedTokenizerBase,
    request: m.AddRequest,
    first_index: int,
    stop: list[str],
    skip_special_tokens: bool,
    continues_prompt: bool,
) -> AsyncIterator[ChoiceDelta]:
    """The deltas of the ``request.n`` choices of one engine request, numbered from
    ``first_index``, as they come. A choice ended by a stop string is aborted in the
    scheduler at once; the others go on."""
    decoders = {
        output_id: ChoiceDecoder(tokenizer, request.prompt_token_ids, first_index + i, stop, skip_special_tokens,
                                 continues_prompt)
        for i, output_id in enumerate(m.choice_request_ids(request.request_id, request.n))
    }
    stream: AsyncGenerator[m.RequestOutput, None] = engine.generate(request)
    try:
        async for out in stream:
            decoder = decoders.get(out.request_id)
            if decoder is None:
                continue  # a choice already ended here by a stop string
            delta = decoder.feed(out)
            yield delta
            if delta.finish_reason is not None:
                del decoders[out.request_id]
                if not decoders:
                    return  # leaving the stream aborts whatever still runs
                if out.finish_reason is None:
                    await engine.abort([out.request_id])
    finally:
        await stream.aclose()


# JSON has no -Infinity; a masked token's logprob is shown as this (as OpenAI does).
_MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def completion_logprobs(result_logprobs: list[m.TokenLogprobs], token_ids: list[int],
                        token_text: TokenText) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    offset = 0
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(lp.logprob) for lp in result_logprobs],
        "top_logprobs": [
            {token_text(t): _finite(v) for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)}
            for lp in result_logprobs
        ],
        "text_offset": offsets,
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
