"""Scheduling through the whole service: preemption under a tiny KV cache,
aborts in every state, and a full queue answered with 503 + Retry-After."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.reference import Greedy, assert_greedy_close
from tests.stack import ServeStack

MODEL = "SmolLM2-135M-Instruct"
EXTRA = {"return_token_ids": True, "return_tokens_as_token_ids": True}
PROMPTS = [f"Question {i}: what comes after {i * 3}? Answer:" for i in range(8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeStack]:
    """12 KV blocks of 16 tokens (192 tokens) for 6 sequences: they cannot all fit; a
    16-token step budget spreads any prompt over several steps."""
    log = tmp_path_factory.mktemp("tiny") / "serve.log"
    server = ServeStack("--kv-cache-gb", str(12 * 737_280 / 2**30), "--max-num-seqs", "6",
                        "--max-num-batched-tokens", "16",
                        log_path=log)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


def _greedy(choice: Any) -> Greedy:
    tops = [{int(k.split(":")[1]): v for k, v in t.items()} for t in choice.logprobs.top_logprobs]
    return Greedy(choice.model_extra["token_ids"], tops)


async def _complete(base_url: str, prompt: str, max_tokens: int) -> Greedy:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        resp: Any = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               logprobs=5, extra_body={**EXTRA, "ignore_eos": True})
        return _greedy(resp.choices[0])


def test_preemption_gives_the_same_outputs_as_an_unconstrained_run(stack: ServeStack, tiny: ServeStack) -> None:
    reference = [asyncio.run(_complete(stack.base_url, p, 40)) for p in PROMPTS[:6]]
    before = tiny.get("/health")[1]["num_preemptions"]

    async def together() -> list[Greedy]:
        return await asyncio.gather(*(_complete(tiny.base_url, p, 40) for p in PROMPTS[:6]))

    got = asyncio.run(together())
    info = tiny.wait_idle()
    assert info["num_preemptions"] > before, "the tiny cache should have forced preemptions"
    for i, (ref, ours) in enumerate(zip(reference, got, strict=True)):
        assert_greedy_close(ref, ours, f"prompt {i} under preemption")
        assert len(ours.token_ids) == 40


def test_a_request_that_can_never_fit_is_refused(tiny: ServeStack) -> None:
    resp = httpx.post(tiny.base_url + "/v1/completions", timeout=30,
                      json={"prompt": "hello", "max_tokens": 400})
    assert resp.status_code == 400
    assert "can never fit in the KV cache" in resp.json()["error"]["message"]
    tiny.wait_idle()


async def _complete_n(base_url: str, prompt: str, max_tokens: int, n: int) -> list[Greedy]:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        resp: Any = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               n=n, logprobs=5, extra_body={**EXTRA, "ignore_eos": True})
        return [_greedy(choice) for choice in sorted(resp.choices, key=lambda choice: choice.index)]


def test_preempted_choices_of_parallel_requests_give_the_same_outputs(stack: ServeStack, tiny: ServeStack) -> None:
    """Two requests of three greedy choices each: six sequences of ~50 tokens in 12 blocks of
    16 tokens. Choices are preempted and recomputed alone; each still equals the single answer."""
    reference = [asyncio.run(_complete(stack.base_url, p, 40)) for p in PROMPTS[:2]]
    before = tiny.get("/health")[1]

    async def together() -> list[list[Greedy]]:
        return await asyncio.gather(*(_complete_n(tiny.base_url, p, 40, 3) for p in PROMPTS[:2]))

    got = asyncio.run(together())
    info = tiny.wait_idle()
    assert info["num_preemptions"] > before["num_preemptions"], "the tiny cache should have forced preemptions"
    for i, (ref, choices) in enumerate(zip(reference, got, strict=True)):
        for c, ours in enumerate(choices):
            assert_greedy_close(ref, ours, f"prompt {i} choice {c} under preemption")
            assert len(ours.token_ids) == 40


def test_admission_counts_every_choice(tiny: ServeStack) -> None:
    """"hello" + 60 tokens takes 4 blocks of 16: one choice fits the 12 blocks, four never do."""
    body = {"prompt": "hello", "max_tokens": 60, "ignore_eos": True}
    assert httpx.post(tiny.base_url + "/v1/completions", timeout=60, json=body).status_code == 200
    resp = httpx.post(tiny.base_url + "/v1/completions", timeout=30, json={**body, "n": 4})
    assert resp.status_code == 400
    assert "n = 4 choices" in resp.json()["error"]["message"]
    assert "can never fit in the KV cache" in resp.json()["error"]["message"]
    resp = httpx.post(tiny.base_url + "/v1/completions", timeout=30, json={**body, "max_tokens": 2, "n": 7})
    assert resp.status_code == 400 and "--max-num-seqs" in resp.json()["error"]["message"]
    tiny.wait_idle()


def _wait_for(predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = predicate()
        if info:
            return info
        time.sleep(0.02)
    raise AssertionError("condition not reached")


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeStack]:
    """One sequence at a time and room for two waiting requests."""
    log = tmp_path_factory.mktemp("queue") / "serve.log"
    server = ServeStack("--kv-cache-gb", "0.1", "--max-num-seqs", "1", "--max-waiting-requests", "2",
                        "--queue-full-retry-after-s", "2", log_path=log)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


def test_full_queue_is_a_503_with_retry_after_and_aborts_free_everything(one_at_a_time: ServeStack) -> None:
    """Five long streams, one after the other: one runs, two wait, two are refused at
    once with 503 + Retry-After. Then every connection closes: requests are aborted
    while waiting and while decoding, and everything is freed."""
    long_body = {"prompt": "Tell me a story.", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    stack = one_at_a_time

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
            tasks = []
            for expected in (1, 2, 3):
                tasks.append(asyncio.create_task(_open_stream(client, long_body)))
                await asyncio.to_thread(_wait_for, lambda n=expected: (i := stack.get("/health")[1])
                                        and i["num_running"] + i["num_waiting"] == n and i)
            tasks += [asyncio.create_task(_open_stream(client, long_body)) for _ in range(2)]
            done, pending = await asyncio.wait(tasks, timeout=3)
            refusals = [t.result() for t in done]
            assert len(refusals) == 2, "a full queue must answer at once"
            for status, retry_after, message in refusals:
                assert (status, retry_after) == (503, "2")
                assert "queue is full" in message
            assert len(pending) == 3
            refused = await client.post("/v1/completions", json={"prompt": "one more", "max_tokens": 5})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            for task in pending:  # cancelling closes the connections
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(scenario())
    info = stack.wait_idle(timeout=10)
    assert info["kv_blocks_free"] == info["kv_blocks"]


async def _open_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, str | None, str]:
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code, resp.headers.get("retry-after"), (await resp.aread()).decode()
        async for _ in resp.aiter_lines():
            pass
        return 200, None, ""


def test_abort_while_prefilling_frees_everything(tiny: ServeStack) -> None:
    """A 180-token prompt takes about 12 steps of 16 tokens to prefill; the client
    leaves before its first token."""
    body = json.dumps({"prompt": "word " * 179, "max_tokens": 5, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", tiny.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)
    tiny.wait_idle(timeout=10)
