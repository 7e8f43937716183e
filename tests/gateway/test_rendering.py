"""Renderers: each API's bodies, SSE chunks and logprobs, live and replayed from the response cache."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from loomserve.gateway.generation import ChoiceResult
from loomserve.gateway.rendering import (
    DONE,
    ChatRenderer,
    CompletionRenderer,
    Renderer,
    TokenText,
    error_event,
    usage,
)
from loomserve.gateway.response_cache import CachedChoice, CachedPiece, CachedResponse, ResponseRecorder
from loomserve.gateway.synthetic_tokenizer import synthetic_tokenizer
from loomserve.shared import messages as m
from tests.gateway.test_response_cache import answer, chat_lp, recorded_chat


def events(chunks: Iterable[bytes]) -> list[Any]:
    out: list[Any] = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        data = chunk[len(b"data: "):-2].decode()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def completion_lp(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs, strict=True)], "text_offset": offsets}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return synthetic_tokenizer(1000, 1, [2])


def lp(logprob: float, top: dict[int, float]) -> m.TokenLogprobs:
    return m.TokenLogprobs(logprob, list(top), list(top.values()))


# -- live answers ---------------------------------------------------------------


def test_completion_stream_chunks() -> None:
    renderer = CompletionRenderer("cmpl-1", "smol", clock=lambda: 7.9)
    assert renderer.start_stream(2) == []  # completions open with no event
    got = events([renderer.chunk(1, " Hi", [5, 6], None, None), renderer.chunk(0, "", [], None, "length"),
                  renderer.usage_chunk(usage(3, 2)), DONE])
    base = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "smol"}
    assert got == [
        {**base, "choices": [{"index": 1, "text": " Hi", "logprobs": None, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        "[DONE]",
    ]


def test_chat_stream_opens_with_the_role_and_leaves_empty_deltas_empty() -> None:
    renderer = ChatRenderer("chatcmpl-1", "smol", return_token_ids=True, clock=lambda: 5)
    got = events([*renderer.start_stream(2), renderer.chunk(0, "Hi", [5], None, None),
                  renderer.chunk(0, "", [], None, "stop")])
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "smol"}
    assert got == [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]},
        {**base, "choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None,
                              "token_ids": [5]}]},
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "token_ids": []}]},
    ]


def test_chunks_are_compact_and_keep_non_ascii_text() -> None:
    renderer = ChatRenderer("c", "m", clock=lambda: 1)
    renderer.start_stream(1)
    assert renderer.chunk(0, "日本", [], None, None) == (
        'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        '"delta":{"content":"日本"},"logprobs":null,"finish_reason":null}]}\n\n').encode()


@pytest.mark.parametrize("api", [CompletionRenderer, ChatRenderer])
def test_no_logprobs_unless_asked(api: type[Renderer], tokenizer: PreTrainedTokenizerBase) -> None:
    assert api("x", "m").logprobs([lp(-0.5, {5: -0.5})], [5]) is None
    assert api("x", "m", token_text=TokenText(tokenizer)).logprobs([lp(-0.5, {5: -0.5})], [5]) is not None


def test_completion_logprobs_shape(tokenizer: PreTrainedTokenizerBase) -> None:
    renderer = CompletionRenderer("x", "m", token_text=TokenText(tokenizer))
    text = [tokenizer.decode([t]) for t in (500, 501)]
    got = renderer.logprobs([lp(-0.25, {500: -0.25, 7: -1.0}), lp(float("-inf"), {501: float("-inf")})], [500, 501])
    assert got == {"tokens": text, "token_logprobs": [-0.25, -9999.0],
                   "top_logprobs": [{text[0]: -0.25, tokenizer.decode([7]): -1.0}, {text[1]: -9999.0}],
                   "text_offset": [0, len(text[0])]}


def test_chat_logprobs_shape(tokenizer: PreTrainedTokenizerBase) -> None:
    renderer = ChatRenderer("x", "m", token_text=TokenText(tokenizer, as_ids=True))
    assert renderer.logprobs([lp(-0.25, {500: -0.25, 7: -1.5})], [500]) == {"content": [{
        "token": "token_id:500", "logprob": -0.25, "bytes": list(b"token_id:500"),
        "top_logprobs": [{"token": "token_id:500", "logprob": -0.25, "bytes": list(b"token_id:500")},
                         {"token": "token_id:7", "logprob": -1.5, "bytes": list(b"token_id:7")}]}]}


def test_results_bodies_of_both_apis() -> None:
    results = [ChoiceResult(0, "Hello", [5, 6], [], "stop"), ChoiceResult(1, "Bye", [7], [], "length")]
    completion = CompletionRenderer("cmpl-1", "smol", return_token_ids=True, clock=lambda: 9).results_body(
        results, usage(4, 3))
    assert completion == {
        "id": "cmpl-1", "object": "text_completion", "created": 9, "model": "smol",
        "choices": [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop", "token_ids": [5, 6]},
                    {"index": 1, "text": "Bye", "logprobs": None, "finish_reason": "length", "token_ids": [7]}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}
    chat = ChatRenderer("chatcmpl-1", "smol", clock=lambda: 9).results_body(results[:1], usage(4, 2))
    assert chat == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 9, "model": "smol",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}


def test_error_event() -> None:
    assert events([error_event(m.ErrorInfo(503, "the scheduler stopped answering", "engine_error"))]) == [
        {"error": {"message": "the scheduler stopped answering", "type": "engine_error", "param": None,
                   "code": 503}}]


@pytest.mark.parametrize("api", [CompletionRenderer, ChatRenderer])
def test_a_recorded_stream_replays_byte_for_byte(api: type[Renderer], tokenizer: PreTrainedTokenizerBase) -> None:
    """What the cache stores while a stream goes out (as RequestLifecycle records it) replays as the same bytes."""
    live = api("r", "smol", return_token_ids=True, token_text=TokenText(tokenizer), clock=lambda: 3)
    recorder = ResponseRecorder(api.kind, 2)
    sent = list(live.start_stream(2))
    for index, text, token_ids, finish in [(0, "t500", [500], None), (1, "t600", [600], None),
                                           (0, " t501", [501], "stop"), (1, "", [], "length")]:
        logprobs = live.logprobs([lp(-0.5, {t: -0.5}) for t in token_ids], token_ids)
        recorder.add(index, text, token_ids, logprobs, finish)
        sent.append(live.chunk(index, text, token_ids, logprobs, finish))
    cached = recorder.result(prompt_tokens=2, completion_tokens=3)
    assert cached is not None
    sent += [live.usage_chunk(usage(2, 3)), DONE]
    # Replay goes choice after choice: the same events, reordered by choice.
    replayed = list(api("r", "smol", return_token_ids=True, clock=lambda: 3).replay_events(cached, include_usage=True))
    opening = len(sent) - 6
    assert replayed[:opening] == sent[:opening]
    assert replayed[opening:] == [sent[opening], sent[opening + 2], sent[opening + 1], sent[opening + 3],
                                  *sent[-2:]]


# -- replayed from the response cache ---------------------------------------------


def test_replay_chat_as_sse() -> None:
    renderer = ChatRenderer("chatcmpl-1", "smol", return_token_ids=True, clock=lambda: 123)
    got = events(renderer.replay_events(recorded_chat(), include_usage=True))
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["id"] == "chatcmpl-1" and c["object"] == "chat.completion.chunk" and c["created"] == 123
               and c["model"] == "smol" for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"],
             c["choices"][0]["token_ids"]) for c in chunks[2:5]] == [
        (0, {"content": "Hel"}, None, [1, 2]),
        (0, {"content": "lo"}, "stop", [3]),
        (1, {"content": "Bye"}, "length", [7]),
    ]
    assert chunks[2]["choices"][0]["logprobs"] == {"content": [chat_lp("He", -0.1), chat_lp("l", -0.2)]}
    assert chunks[5] == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 123, "model": "smol",
                         "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}}
    assert len(chunks) == 6


def test_replay_sse_leaves_out_usage_and_token_ids_unless_asked() -> None:
    got = events(ChatRenderer("x", "smol").replay_events(recorded_chat()))
    assert got[-1] == "[DONE]"
    assert all("usage" not in c and "token_ids" not in c["choices"][0] for c in got[:-1])
    assert len(got) == 2 + 3 + 1


def test_replay_completion_as_sse() -> None:
    cached = answer("Hello world", pieces=2)
    got = events(CompletionRenderer("cmpl-1", "smol").replay_events(cached, include_usage=True))
    assert got[-1] == "[DONE]"
    content = [c["choices"][0] for c in got[:-2]]
    assert "".join(c["text"] for c in content) == "Hello world"
    assert [c["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["stop"]
    assert all(c["object"] == "text_completion" for c in got[:-1])
    assert got[-2]["usage"]["completion_tokens"] == len("Hello world")


def test_replay_sse_skips_pieces_that_show_nothing() -> None:
    cached = CachedResponse("chat", [CachedChoice([CachedPiece("Hi", [5]), CachedPiece("", []), CachedPiece("", [])],
                                                  "stop")], 2, 1)
    got = events(ChatRenderer("c", "m").replay_events(cached))
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in got[1:-1]]
    assert deltas == [({"content": "Hi"}, None), ({}, "stop")]  # the last one carries the finish reason
    with_ids = events(ChatRenderer("c", "m", return_token_ids=True).replay_events(cached))
    assert len(with_ids) == 1 + 3 + 1  # asked for token ids: every piece is sent, as the live stream does


def test_replay_sse_ends_a_choice_without_pieces() -> None:
    cached = CachedResponse("completion", [CachedChoice([], "length")], 3, 0)
    got = events(CompletionRenderer("c", "m").replay_events(cached))
    assert got[0]["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]


def test_replay_chat_as_json_merges_pieces() -> None:
    body = ChatRenderer("chatcmpl-1", "smol", return_token_ids=True, clock=lambda: 5).replay_body(recorded_chat())
    assert body["object"] == "chat.completion" and body["created"] == 5 and body["id"] == "chatcmpl-1"
    assert body["choices"][0] == {
        "index": 0, "message": {"role": "assistant", "content": "Hello"},
        "logprobs": {"content": [chat_lp("He", -0.1), chat_lp("l", -0.2), chat_lp("lo", -0.3)]},
        "finish_reason": "stop", "token_ids": [1, 2, 3]}
    assert body["choices"][1]["message"]["content"] == "Bye"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}


def test_replay_completion_as_json_recomputes_text_offsets() -> None:
    rec = ResponseRecorder("completion", 1)
    rec.add(0, " Hello", [1, 2], completion_lp([" He", "llo"], [-0.1, -0.2]))
    rec.add(0, " you", [3], completion_lp([" you"], [-0.3]), "stop")
    cached = rec.result(3, 3)
    assert cached is not None
    body = CompletionRenderer("cmpl-1", "smol").replay_body(cached)
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == " Hello you" and "token_ids" not in choice
    assert choice["logprobs"] == {"tokens": [" He", "llo", " you"], "token_logprobs": [-0.1, -0.2, -0.3],
                                  "top_logprobs": [{" He": -0.1}, {"llo": -0.2}, {" you": -0.3}],
                                  "text_offset": [0, 3, 6]}


def test_replay_json_without_logprobs() -> None:
    body = CompletionRenderer("c", "m").replay_body(answer("abc"))
    assert body["choices"] == [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": "stop"}]
