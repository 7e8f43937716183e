"""A dummy-weight model served honestly over HTTP: ``loomserve serve --load-format dummy
--model llama-tiny`` (a 2-layer shape) with the synthetic tokenizer the gateway builds for it,
through the real three processes, the ``openai`` client and ``bench.serving``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from bench.serving import BenchConfig, run_benchmark
from bench.workloads import rag_workload
from loomserve.gateway.synthetic_tokenizer import synthetic_tokenizer_for
from loomserve.shared.dummy_shapes import DUMMY_SHAPES
from tests.stack import ServeStack

SHAPE = "llama-tiny"
VOCAB = DUMMY_SHAPES[SHAPE]["vocab_size"]
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeStack]:
    log = tmp_path_factory.mktemp("tiny") / "serve.log"
    server = ServeStack("--load-format", "dummy", "--model", SHAPE, "--kv-cache-gb", "0.05",
                        "--max-model-len", str(MAX_MODEL_LEN), "--response-cache", "false", log_path=log)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, server.log_tail()


@pytest.fixture
def client(tiny_stack: ServeStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tiny_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
    tiny_stack.wait_idle()


def test_token_id_prompt_and_text_output(client: openai.OpenAI, tiny_stack: ServeStack) -> None:
    assert [m.id for m in client.models.list().data] == [SHAPE]
    tokenizer, _ = synthetic_tokenizer_for(DUMMY_SHAPES[SHAPE])
    prompt = list(range(300, 340))
    resp = client.completions.create(model=SHAPE, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 12
    choice = resp.choices[0]
    assert choice.model_extra is not None
    ids = choice.model_extra["token_ids"]
    assert len(ids) == 12 and all(0 <= i < VOCAB for i in ids)
    # The text is the detokenised output, as a completion of the prompt's text.
    context = tokenizer.decode(prompt[-4:], skip_special_tokens=True)
    assert choice.text == tokenizer.decode(prompt[-4:] + ids, skip_special_tokens=True)[len(context):]
    assert choice.text.strip()


def test_text_prompt_and_chat(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=SHAPE, prompt="The capital of France is", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage is not None
    # BOS + 5 words spelled out in character pieces: "The" = T ##h ##e, ...
    assert resp.usage.prompt_tokens == 1 + 20 and resp.usage.completion_tokens == 5
    chat = client.chat.completions.create(model=SHAPE, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage is not None and chat.usage.completion_tokens == 4
    assert chat.choices[0].message.content


def test_out_of_range_token_id_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.completions.create(model=SHAPE, prompt=[1, VOCAB], max_tokens=2)


def test_serving_benchmark_streams_forced_lengths(tiny_stack: ServeStack) -> None:
    """What the ablation benchmark does: rag token-id prompts, streamed, EOS ignored."""
    workload = rag_workload(6, seed=0, vocab_size=VOCAB, max_model_len=256)
    result = asyncio.run(run_benchmark(BenchConfig(workload, base_url=tiny_stack.base_url, concurrency=3)))
    assert result.model == SHAPE
    assert result.metrics.completed == 6, result.metrics.errors
    assert result.metrics.output_len_mismatches == 0
    assert result.metrics.total_output_tokens == sum(r.output_len for r in workload.requests)
    tiny_stack.wait_idle()
