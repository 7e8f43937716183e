"""transformers' static batches, timed per token, with a tiny random Llama on the CPU."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.harness.hf_generate import run_static_batches


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_each_request_gets_its_own_length_and_times(model: LlamaForCausalLM) -> None:
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    outcomes, duration = run_static_batches(model, prompts, [3, 5, 2, 4], 2, 0)
    assert [(o.prompt_len, o.output_tokens) for o in outcomes] == [(3, 3), (2, 5), (4, 2), (1, 4)]
    for o in outcomes:
        assert o.ttft_s is not None and o.e2el_s is not None and 0 < o.ttft_s <= o.e2el_s <= duration
        assert len(o.itls_s) == o.output_tokens - 1
    # The second batch starts once the first (five tokens, for its longest request) has ended.
    assert outcomes[2].ttft_s is not None and outcomes[1].e2el_s is not None
    assert outcomes[2].ttft_s > outcomes[1].e2el_s


def test_no_batch_starts_after_the_deadline(model: LlamaForCausalLM) -> None:
    outcomes, _ = run_static_batches(model, [[1, 2]] * 4, [2] * 4, 2, 0, deadline=time.perf_counter() - 1)
    assert outcomes == []
