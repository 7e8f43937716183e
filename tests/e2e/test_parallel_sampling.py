"""Parallel sampling (n > 1) through the whole service: one engine request per prompt,
prefilled once and forked in the scheduler, with the official openai client."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from tests.e2e.reference import Greedy, assert_greedy_close
from tests.stack import ServeStack

MODEL = "SmolLM2-135M-Instruct"
EXTRA = {"return_token_ids": True, "return_tokens_as_token_ids": True, "ignore_eos": True}
PROMPT = "The three most useful things to pack for a long hike are"


def _greedy(choice: Any) -> Greedy:
    tops = [{int(k.split(":")[1]): v for k, v in top.items()} for top in choice.logprobs.top_logprobs]
    return Greedy(choice.model_extra["token_ids"], tops)


def _token_ids(choice: Any) -> list[int]:
    return list(choice.model_extra["token_ids"])


def _settled_health(stack: ServeStack) -> dict[str, Any]:
    """/health once idle and refreshed since: the gateway polls the scheduler's status every
    second, so right after a request it may still report counters from before it."""
    stack.wait_idle()
    time.sleep(2.5)
    return stack.wait_idle()


def _counters_after(stack: ServeStack, before: dict[str, Any], forks: int, timeout: float = 15.0) -> dict[str, Any]:
    """/health once the scheduler reported ``forks`` more forks and nothing running (the
    gateway refreshes the scheduler's status every second)."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = stack.get("/health")[1]
        if (info.get("num_forks") == before["num_forks"] + forks and info["num_running"] == 0
                and info["num_waiting"] == 0):
            return info
        time.sleep(0.1)
    raise AssertionError(f"the scheduler did not report {forks} fork(s) after {before}: {info}")


def test_greedy_choices_equal_the_single_answer_and_the_prompt_is_prefilled_once(
        stack: ServeStack, client: openai.OpenAI) -> None:
    max_tokens = 12
    single = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                       logprobs=5, extra_body=EXTRA)
    assert single.usage is not None
    prompt_len = single.usage.prompt_tokens
    before = _settled_health(stack)
    three = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, n=3,
                                      logprobs=5, extra_body=EXTRA)
    after = _counters_after(stack, before, forks=1)

    assert [c.index for c in three.choices] == [0, 1, 2]
    for choice in three.choices:
        assert_greedy_close(_greedy(single.choices[0]), _greedy(choice), f"choice {choice.index}")
        assert len(_greedy(choice).token_ids) == max_tokens and choice.finish_reason == "length"
    assert three.usage is not None
    assert three.usage.prompt_tokens == prompt_len and three.usage.completion_tokens == 3 * max_tokens
    # One prefix-cache lookup of the prompt (n separate requests would make three), one fork,
    # and the prompt computed once: its first L-1 tokens by the parent, then per choice its
    # last prompt token and max_tokens - 1 outputs fed back.
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == prompt_len
    assert after["num_scheduled_tokens"] - before["num_scheduled_tokens"] == prompt_len - 1 + 3 * max_tokens
    assert after["num_block_copies"] - before["num_block_copies"] == (2 if (prompt_len - 1) % 16 else 0)


def test_seeded_choices_equal_separate_requests_with_consecutive_seeds(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0,
                              "top_p": 0.9, "extra_body": {**EXTRA, "top_k": 50}}
    together = client.completions.create(n=3, seed=4242, **params)
    separate = [client.completions.create(seed=4242 + i, **params) for i in range(3)]
    got = [_token_ids(c) for c in together.choices]
    assert got == [_token_ids(s.choices[0]) for s in separate]
    assert len({tuple(t) for t in got}) > 1, "three seeds should not all sample the same text"
    assert client.completions.create(n=3, seed=4242, **params).choices == together.choices


def test_streamed_choices_with_stop_strings_and_a_batch_of_prompts(client: openai.OpenAI) -> None:
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0)
    text = base.choices[0].text
    assert ", 8," in text, text
    # two prompts x two choices: choices 0, 1 belong to the first prompt, 2, 3 to the second
    stream = client.completions.create(model=MODEL, prompt=["1, 2, 3, 4, 5,", PROMPT], max_tokens=20,
                                       temperature=0, n=2, stop=[", 8"], stream=True,
                                       stream_options={"include_usage": True})
    texts = ["", "", "", ""]
    finish: list[str | None] = [None] * 4
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts[0] == texts[1] == text[: text.index(", 8")]
    assert finish[:2] == ["stop", "stop"]
    assert texts[2] == texts[3] and texts[2] != texts[0]
    assert usage is not None and usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_n(client: openai.OpenAI, stream: bool) -> None:
    messages: Any = [{"role": "user", "content": "Name a fruit."}]
    if not stream:
        resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0.8,
                                              seed=7, n=4)
        assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
        assert all(c.message.content for c in resp.choices)
        return
    contents = ["", "", "", ""]
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0.8,
                                                seed=7, n=4, stream=True):
        for c in chunk.choices:
            contents[c.index] += c.delta.content or ""
    assert all(contents)
