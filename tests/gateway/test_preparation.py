"""Request preparation: bodies in, validated engine requests out (tokenize, chat template,
context length, sampling parameters with the model's defaults)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loomserve.gateway.model_info import ModelInfo
from loomserve.gateway.preparation import PreparedRequest, RequestPreparer
from loomserve.gateway.protocol import APIError
from loomserve.gateway.sampling_defaults import SamplingDefaults
from loomserve.gateway.synthetic_tokenizer import synthetic_tokenizer

VOCAB, BOS, EOS = 1000, 1, 2
CONTEXT = 64
MODEL = ModelInfo("smol", synthetic_tokenizer(VOCAB, BOS, [EOS]), [EOS], "r1",
                  SamplingDefaults({"temperature": 0.2, "top_p": 0.9}, "test"))


def preparer(context: int = CONTEXT) -> RequestPreparer:
    return RequestPreparer(MODEL, lambda: context)


def completion(**body: Any) -> PreparedRequest:
    return preparer().completion(json.dumps({"prompt": [500, 501], **body}).encode())


def chat(**body: Any) -> PreparedRequest:
    return preparer().chat(json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode())


def refusal(prepare: Any, **body: Any) -> APIError:
    with pytest.raises(APIError) as refused:
        prepare(**body)
    return refused.value


def test_completion_of_a_text_prompt() -> None:
    prep = completion(prompt="t500 t501", n=2, stop="x", stream=True, stream_options={"include_usage": True})
    assert prep.prompts == [[BOS, 500, 501]]
    assert prep.response_id.startswith("cmpl-") and prep.continues_prompt
    assert (prep.n, prep.num_choices, prep.stop, prep.stream, prep.include_usage) == (2, 2, ["x"], True, True)
    assert prep.sampling.max_tokens == 16  # OpenAI's default for completions


def test_completion_prompt_forms() -> None:
    assert completion(prompt=[7, 8]).prompts == [[7, 8]]
    assert completion(prompt=[[7], [8, 9]]).prompts == [[7], [8, 9]]
    assert completion(prompt=["t700", "t800"]).prompts == [[BOS, 700], [BOS, 800]]
    assert completion(prompt=[[7], [8, 9]], n=3).num_choices == 6


def test_chat_applies_the_template_and_may_use_the_whole_context() -> None:
    prep = chat()
    assert prep.prompts == [MODEL.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                add_generation_prompt=True, tokenize=True,
                                                                return_dict=False)]
    assert prep.response_id.startswith("chatcmpl-") and not prep.continues_prompt
    assert prep.sampling.max_tokens == CONTEXT - len(prep.prompts[0])
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}])
    assert parts.prompts == prep.prompts
    assert chat(max_tokens=5, max_completion_tokens=7).sampling.max_tokens == 7


def test_sampling_defaults_fill_only_what_the_body_leaves_out() -> None:
    defaults = completion().sampling
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p,
            defaults.repetition_penalty) == (0.2, 0.9, 0, 0.0, 1.0)
    sent = completion(temperature=0, top_p=0.5, top_k=-1, min_p=0.1, repetition_penalty=1.2, seed=3).sampling
    assert (sent.temperature, sent.top_p, sent.top_k, sent.min_p, sent.repetition_penalty, sent.seed) == (
        0, 0.5, 0, 0.1, 1.2, 3)


def test_stop_token_ids_logprobs_and_extensions() -> None:
    assert completion(stop_token_ids=[9, EOS]).sampling.stop_token_ids == [EOS, 9]
    assert completion(ignore_eos=True).sampling.stop_token_ids == []
    prep = completion(logprobs=2, logit_bias={"7": 5}, priority=3, queue_timeout=1.5, return_token_ids=True,
                      return_tokens_as_token_ids=True)
    assert prep.want_logprobs and prep.sampling.logprobs == 2 and prep.sampling.logit_bias == {7: 5}
    assert (prep.priority, prep.queue_timeout_s, prep.return_token_ids, prep.tokens_as_ids) == (3, 1.5, True, True)
    assert not completion().want_logprobs
    assert chat(logprobs=True).sampling.logprobs == 0 and chat(logprobs=True, top_logprobs=4).sampling.logprobs == 4
    assert not chat(top_logprobs=4).want_logprobs


@pytest.mark.parametrize(("body", "status", "param", "message"), [
    ({"model": "other"}, 404, "model", "the model 'other' does not exist; this server serves 'smol'"),
    ({"echo": True}, 400, "echo", "echo is not supported"),
    ({"logprobs": 21}, 400, "logprobs", "logprobs must be between 0 and 20"),
    ({"prompt": []}, 400, "prompt", "prompt must be a string"),
    ({"prompt": [[]]}, 400, "prompt", "the prompt is empty"),
    ({"prompt": [VOCAB]}, 400, "prompt", f"token id {VOCAB} is out of range for a vocabulary of {VOCAB}"),
    ({"logit_bias": {"1000": 1}}, 400, "logit_bias", "logit_bias has a token id outside the vocabulary"),
    ({"temperature": 3}, 400, "temperature", "temperature must be between 0 and 2"),
    ({"max_tokens": "many"}, 400, "max_tokens", "invalid request: Expected `int | null`, got `str`"),
])
def test_completion_refusals(body: dict[str, Any], status: int, param: str, message: str) -> None:
    error = refusal(completion, **body)
    assert (error.status, error.param) == (status, param)
    assert error.message.startswith(message)


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"messages": []}, "messages", "messages must not be empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "messages[0].role is 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "only text content parts are supported"),
    ({"top_logprobs": 21}, "top_logprobs", "top_logprobs must be between 0 and 20"),
])
def test_chat_refusals(body: dict[str, Any], param: str, message: str) -> None:
    error = refusal(chat, **body)
    assert (error.status, error.param) == (400, param)
    assert error.message.startswith(message)


def test_context_length_checks() -> None:
    long = refusal(lambda: preparer(context=2).completion(b'{"prompt": [5, 6]}'))
    assert (long.status, long.param, long.code) == (400, "prompt", "context_length_exceeded")
    assert long.message == "this model's maximum context length is 2 tokens, but the prompt has 2 tokens"
    over = refusal(lambda: preparer(context=10).completion(b'{"prompt": [5, 6], "max_tokens": 9}'))
    assert (over.param, over.code) == ("max_tokens", "context_length_exceeded")
    assert over.message == ("this model's maximum context length is 10 tokens, but 2 prompt tokens + 9 max_tokens "
                            "= 11; lower max_tokens or shorten the prompt")
    # The default of 16 shrinks to what the context leaves; the longest prompt decides.
    assert preparer(context=10).completion(b'{"prompt": [[5], [5, 6, 7]]}').sampling.max_tokens == 7


def test_the_engine_is_asked_only_for_a_valid_body() -> None:
    def engine_down() -> int:
        raise APIError(503, "the engine is not ready", type="engine_unavailable")

    down = RequestPreparer(MODEL, engine_down)
    assert refusal(lambda: down.completion(b'{"prompt": [5], "echo": true}')).status == 400
    assert refusal(lambda: down.chat(b"")).message == "the request body is empty; send a JSON object"
    assert refusal(lambda: down.completion(b'{"prompt": [5]}')).status == 503


def test_engine_requests_fan_out_one_per_prompt() -> None:
    prep = completion(prompt=[[7], [8, 9]], n=3, priority=2, queue_timeout=4.0)
    requests = prep.engine_requests("acme", lambda p: f"trace-{p}")
    assert [first for first, _ in requests] == [0, 3]
    assert [add.request_id for _, add in requests] == [f"{prep.response_id}-0", f"{prep.response_id}-1"]
    assert [add.prompt_token_ids for _, add in requests] == [[7], [8, 9]]
    assert [add.traceparent for _, add in requests] == ["trace-0", "trace-1"]
    assert all(add.n == 3 and add.tenant == "acme" and add.priority == 2 and add.queue_timeout_s == 4.0
               and add.sampling is prep.sampling for _, add in requests)
