"""Generated choices: token ids from the engine in, text out.

Per output token: detokenize incrementally (never half a UTF-8 character) and
run the stop-string matcher (cut exactly before a stop string, hold back text
that might start one). When a stop string is found the choice is aborted in the
scheduler and ends with ``finish_reason`` "stop". One engine request carries
the ``n`` choices of a prompt; a request with several prompts fans out into one
engine request per prompt, whose deltas ``merged_choices`` interleaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from loomserve.gateway.detokenizer import IncrementalDetokenizer
from loomserve.gateway.engine_client import EngineClient
from loomserve.gateway.preparation import PreparedRequest
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


async def merged_choices(engine: EngineClient, tokenizer: PreTrainedTokenizerBase, prep: PreparedRequest,
                         engine_requests: list[tuple[int, m.AddRequest]],
                         on_tokens: Callable[[int], None]) -> AsyncGenerator[ChoiceDelta, None]:
    """The deltas of every choice of ``engine_requests`` (``prep.engine_requests``), as they
    come, until each choice ended; ``on_tokens`` is told the token count of each. An error
    of any engine request ends them all; leaving early aborts what still runs."""
    queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()

    async def run(first_index: int, add: m.AddRequest) -> None:
        try:
            async for delta in generate_choices(engine, tokenizer, add, first_index, prep.stop,
                                                prep.skip_special_tokens, prep.continues_prompt):
                queue.put_nowait(delta)
        except Exception as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(run(i, add)) for i, add in engine_requests]
    remaining = prep.num_choices  # choices not ended yet
    try:
        while remaining:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            on_tokens(len(item.token_ids))
            yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
