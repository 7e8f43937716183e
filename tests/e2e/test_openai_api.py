"""The whole service (gateway -> ZeroMQ -> scheduler -> worker, three processes)
through HTTP with the official openai client, on the real default model."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loomserve.gateway.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer
from tests.e2e.reference import Greedy, assert_greedy_close, hf_greedy, load_hf_model
from tests.stack import ServeStack

MAX_TOKENS = 24
TOP = 5

COMPLETION_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "1, 2, 3, 4, 5,",
    "Translate to French: Good morning ->",
    "The most important rule of writing clean code is",
]
CHATS: list[list[Any]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Color of the sky?"}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Give me a synonym for happy."}],
    [{"role": "user", "content": "What is 12 times 12?"}],
    [{"role": "user", "content": "Name a famous physicist."}],
    [{"role": "user", "content": "Say hello in Spanish."}],
]


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Any:
    return load_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def reference(default_model_path: Path, tokenizer: Any) -> dict[str, Greedy]:
    """HF transformers greedy outputs (fp32, CPU) for every prompt and chat."""
    model = load_hf_model(default_model_path)
    eos = eos_token_ids(tokenizer, default_model_path)
    refs = {}
    for i, prompt in enumerate(COMPLETION_PROMPTS):
        refs[f"completion-{i}"] = hf_greedy(model, tokenizer.encode(prompt), MAX_TOKENS, eos, TOP)
    for i, chat in enumerate(CHATS):
        refs[f"chat-{i}"] = hf_greedy(model, apply_chat_template(tokenizer, chat), MAX_TOKENS, eos, TOP)
    return refs


def _token_id(name: str) -> int:
    assert name.startswith("token_id:"), name
    return int(name.split(":", 1)[1])


def _completion_greedy(choice: Any) -> Greedy:
    extra = choice.model_extra
    tops = [{_token_id(k): v for k, v in top.items()} for top in choice.logprobs.top_logprobs]
    return Greedy(extra["token_ids"], tops)


def _chat_greedy(choice: Any) -> Greedy:
    tops = [{_token_id(t.token): t.logprob for t in c.top_logprobs} for c in choice.logprobs.content]
    return Greedy(choice.model_extra["token_ids"], tops)


EXTRA = {"return_token_ids": True, "return_tokens_as_token_ids": True}


def test_completions_greedy_equal_transformers(client: openai.OpenAI, reference: dict[str, Greedy]) -> None:
    for i, prompt in enumerate(COMPLETION_PROMPTS):
        resp: Any = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0, logprobs=TOP, extra_body=EXTRA)
        ours = _completion_greedy(resp.choices[0])
        assert_greedy_close(reference[f"completion-{i}"], ours, f"completion {i}")
        assert resp.usage is not None and resp.usage.completion_tokens == len(ours.token_ids)


def test_completions_streamed_greedy_equal_transformers(client: openai.OpenAI, reference: dict[str, Greedy],
                                                        tokenizer: Any) -> None:
    for i, prompt in enumerate(COMPLETION_PROMPTS):
        stream: Any = client.completions.create(prompt=prompt, model="SmolLM2-135M-Instruct", max_tokens=MAX_TOKENS,
                                           temperature=0, logprobs=TOP, stream=True, extra_body=EXTRA,
                                           stream_options={"include_usage": True})
        ids: list[int] = []
        tops: list[dict[int, float]] = []
        text = ""
        usage = None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                ids += choice.model_extra["token_ids"]
                tops += [{_token_id(k): v for k, v in t.items()} for t in choice.logprobs.top_logprobs]
                text += choice.text
        ref = reference[f"completion-{i}"]
        assert_greedy_close(ref, Greedy(ids, tops), f"streamed completion {i}")
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert usage is not None and usage.completion_tokens == len(ids)
        assert usage.prompt_tokens == len(tokenizer.encode(prompt))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equal_transformers(client: openai.OpenAI, reference: dict[str, Greedy], stream: bool) -> None:
    for i, chat in enumerate(CHATS):
        if not stream:
            resp: Any = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=chat,
                                                  max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
                                                  top_logprobs=TOP, extra_body=EXTRA)
            ours = _chat_greedy(resp.choices[0])
            content = resp.choices[0].message.content
        else:
            ids: list[int] = []
            tops: list[dict[int, float]] = []
            content = ""
            chunks: Any = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=chat,
                                                        max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
                                                        top_logprobs=TOP, stream=True, extra_body=EXTRA)
            for chunk in chunks:
                for choice in chunk.choices:
                    ids += choice.model_extra.get("token_ids", [])
                    if choice.logprobs is not None:
                        tops += [{_token_id(t.token): t.logprob for t in c.top_logprobs}
                                 for c in choice.logprobs.content]
                    content += choice.delta.content or ""
            ours = Greedy(ids, tops)
        assert_greedy_close(reference[f"chat-{i}"], ours, f"chat {i} (stream={stream})")
        assert content


def test_concurrent_requests_equal_their_solo_outputs(stack: ServeStack, async_client: openai.AsyncOpenAI,
                                                      client: openai.OpenAI) -> None:
    """32 requests of different lengths at once: each gets the output it gets alone."""
    prompts = [f"Count from {i}: {i}, {i + 1}," if i % 2 else COMPLETION_PROMPTS[i % 8] + " " * (i % 3)
               for i in range(32)]
    lengths = [4 + (i * 7) % 29 for i in range(32)]

    def solo(i: int) -> Greedy:
        resp: Any = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0, logprobs=TOP, extra_body=EXTRA)
        return _completion_greedy(resp.choices[0])

    alone = [solo(i) for i in range(32)]

    async def one(i: int) -> tuple[Greedy, float, float]:
        started = time.monotonic()
        first = None
        ids: list[int] = []
        tops: list[dict[int, float]] = []
        stream: Any = await async_client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
            logprobs=TOP, stream=True, extra_body=EXTRA)
        async for chunk in stream:
            for choice in chunk.choices:
                if first is None and choice.model_extra["token_ids"]:
                    first = time.monotonic()
                ids += choice.model_extra["token_ids"]
                tops += [{_token_id(k): v for k, v in t.items()} for t in choice.logprobs.top_logprobs]
        assert first is not None
        return Greedy(ids, tops), first - started, time.monotonic() - started

    async def all_at_once() -> list[tuple[Greedy, float, float]]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    together = asyncio.run(all_at_once())
    for i in range(32):
        assert_greedy_close(alone[i], together[i][0], f"request {i} in a batch of 32")
        assert len(together[i][0].token_ids) == len(alone[i].token_ids)
    # Shared batches: every stream was producing tokens while others were too.
    # Short requests finish (leave) long before the long ones, and all first
    # tokens arrive before the longest stream ends.
    end_times = sorted(t[2] for t in together)
    first_tokens = sorted(t[1] for t in together)
    assert first_tokens[-1] < end_times[-1]
    assert end_times[0] < end_times[-1] / 2


def test_stop_strings_cut_exactly(client: openai.OpenAI) -> None:
    base = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                     temperature=0)
    text = base.choices[0].text
    assert ", 8," in text, text
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].text for c in client.completions.create(
                model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0,
                stop=[", 8", "never"], stream=True) if c.choices)
        else:
            resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                             temperature=0, stop=[", 8", "never"])
            got = resp.choices[0].text
            assert resp.choices[0].finish_reason == "stop"
        assert got == text[: text.index(", 8")]


def test_finish_reasons_and_usage(client: openai.OpenAI, tokenizer: Any) -> None:
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=3, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 3
    assert resp.usage.prompt_tokens == len(tokenizer.encode("Hello"))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 3
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=64, temperature=0,
                                          messages=[{"role": "user", "content": "Hi!"}])
    assert chat.choices[0].finish_reason == "stop"  # the model's end-of-turn token
    assert "<|im_end|>" not in (chat.choices[0].message.content or "")


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def draw(seed: int) -> str:
        return client.completions.create(model="SmolLM2-135M-Instruct", prompt="My favourite animal is",
                                         max_tokens=16, temperature=1.0, top_p=0.9, seed=seed,
                                         extra_body={"top_k": 50}).choices[0].text

    assert draw(1234) == draw(1234)
    assert len({draw(s) for s in range(4)}) > 1


def test_models_and_health(stack: ServeStack, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    status, info = stack.get("/health")
    assert status == 200 and info["status"] == "ok" and info["kv_blocks"] > 0


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "invalid request"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "", "max_tokens": 2}).encode(), 400, "empty"),
    (json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), 400, "maximum context length is"),
    (json.dumps({"prompt": [1, 99999999]}).encode(), 400, "out of range"),
])
def test_bad_requests_get_openai_errors(stack: ServeStack, body: bytes, status: int, needle: str) -> None:
    resp = httpx.post(stack.base_url + "/v1/completions", content=body,
                      headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("role", ["wizard", "User", ""])
def test_a_chat_message_with_an_unknown_role_is_a_400(client: openai.OpenAI, role: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=4, messages=[
            {"role": "user", "content": "Hi"}, {"role": role, "content": "Abracadabra"}])  # type: ignore[list-item,misc]
    error = caught.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "messages[1].role" and error["type"] == "invalid_request_error"
    assert f"messages[1].role is {role!r}" in error["message"] and "system, developer, user" in error["message"]


def test_omitted_sampling_fields_take_the_models_declared_values(client: openai.OpenAI) -> None:
    """The default model's card samples at temperature 0.2, top_p 0.9: a seeded request that
    leaves both out draws exactly what one sending them draws, and not what OpenAI's 1.0 would."""
    base: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 32,
                            "extra_body": {"ignore_eos": True}}
    differs_from_openai = []
    for seed in (1, 2, 3):
        omitted = client.completions.create(**base, seed=seed).choices[0].text
        carded = client.completions.create(**base, seed=seed, temperature=0.2, top_p=0.9)
        openai_default = client.completions.create(**base, seed=seed, temperature=1.0, top_p=1.0)
        assert omitted == carded.choices[0].text
        differs_from_openai.append(omitted != openai_default.choices[0].text)
    assert any(differs_from_openai)


def _raw_stream_then_close(port: int, body: dict[str, Any], chunks_before_close: int) -> None:
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        seen = b""
        while seen.count(b"data: ") < chunks_before_close:
            seen += sock.recv(4096)


def test_client_disconnect_aborts_the_request(stack: ServeStack, client: openai.OpenAI) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    _raw_stream_then_close(stack.port, body, chunks_before_close=3)
    info = stack.wait_idle(timeout=5)  # aborted within a step, blocks freed
    assert info["num_running"] == 0


def test_disconnect_of_a_non_streaming_request_aborts_it(stack: ServeStack, client: openai.OpenAI) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.base_url + "/v1/completions", timeout=1.5,
                   json={"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True})
    stack.wait_idle(timeout=5)

