"""Workload generators: determinism, the rag length statistics, clipping, shared prefixes; and the
request sets derived from them (capped outputs, token-id requests)."""

import itertools
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bench.workloads import (
    RAG_INPUT_RANGE,
    RAG_OUTPUT_RANGE,
    SHARED_PREFIX_LEN,
    SHARED_PREFIX_OUTPUT_LEN,
    BenchRequest,
    build_workload,
    cap_outputs,
    fit_lengths,
    jsonl_workload,
    rag_workload,
    random_prompts,
    shared_prefix_workload,
    token_requests,
    token_workload,
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained here, so the tests need no download."""
    rng = np.random.default_rng(0)
    words = [f"{a}{b}{c}" for a in "bdfgklmnprst" for b in "aeiou" for c in "nrstl"]
    corpus = [" ".join(rng.choice(words, size=40)) for _ in range(300)]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["[UNK]"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def lengths(requests: tuple[BenchRequest, ...]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([r.prompt_len for r in requests]),
        np.array([r.output_len for r in requests]),
    )


def test_rag_is_deterministic_per_seed():
    first = rag_workload(64, seed=7, vocab_size=1000)
    assert first == rag_workload(64, seed=7, vocab_size=1000)
    assert first.requests != rag_workload(64, seed=8, vocab_size=1000).requests


def test_request_i_does_not_depend_on_the_number_of_requests():
    short = rag_workload(20, seed=3, vocab_size=1000).requests
    long = rag_workload(100, seed=3, vocab_size=1000).requests
    assert short == long[:20]
    short = shared_prefix_workload(10, seed=3, vocab_size=1000).requests
    assert short == shared_prefix_workload(40, seed=3, vocab_size=1000).requests[:10]


def test_rag_lengths_match_the_target_distribution():
    prompt_lens, output_lens = lengths(rag_workload(10_000, seed=0).requests)
    # Targets of lognormal(median 270, sigma 1.2) on [16, 4096] and lognormal(median 200,
    # sigma 1.1) on [8, 2048]; 10k samples keep these within a few percent.
    assert np.median(prompt_lens) == pytest.approx(270, rel=0.05)
    assert prompt_lens.mean() == pytest.approx(524, rel=0.05)
    assert np.percentile(prompt_lens, 95) == pytest.approx(1944, rel=0.07)
    assert np.median(output_lens) == pytest.approx(200, rel=0.05)
    assert output_lens.mean() == pytest.approx(345, rel=0.05)
    assert np.percentile(output_lens, 95) == pytest.approx(1219, rel=0.07)
    assert (prompt_lens.min(), prompt_lens.max()) == RAG_INPUT_RANGE
    assert (output_lens.min(), output_lens.max()) == RAG_OUTPUT_RANGE


def test_rag_token_id_prompts_have_their_length_and_stay_in_the_vocab():
    workload = rag_workload(200, seed=1, vocab_size=500)
    for request in workload.requests:
        assert isinstance(request.prompt, list)
        assert len(request.prompt) == request.prompt_len
        assert min(request.prompt) >= 0 and max(request.prompt) < 500
    assert workload.params["prompt_form"] == "token_ids"


def test_fit_lengths_shrinks_both_sides_proportionally():
    assert fit_lengths(100, 50, 200, 16, 8) == (100, 50)
    assert fit_lengths(3000, 1000, 2000, 16, 8) == (1500, 500)
    # Each side keeps its minimum.
    assert fit_lengths(4000, 10, 1000, 16, 8) == (992, 8)
    assert fit_lengths(20, 3000, 500, 16, 8) == (16, 484)
    with pytest.raises(ValueError, match="max_model_len"):
        fit_lengths(100, 100, 20, 16, 8)


def test_rag_clips_to_max_model_len_and_says_so(caplog):
    unclipped = rag_workload(500, seed=2, vocab_size=1000)
    too_long = sum(r.prompt_len + r.output_len > 1024 for r in unclipped.requests)
    assert too_long > 0
    clipped = rag_workload(500, seed=2, vocab_size=1000, max_model_len=1024)
    assert clipped.num_clipped == too_long
    assert "shortened to fit max_model_len=1024" in caplog.text
    for before, after in zip(unclipped.requests, clipped.requests, strict=True):
        assert after.prompt_len + after.output_len <= 1024
        assert after.prompt_len >= RAG_INPUT_RANGE[0] and after.output_len >= RAG_OUTPUT_RANGE[0]
        assert len(after.prompt) == after.prompt_len
        if before.prompt_len + before.output_len <= 1024:
            assert (after.prompt_len, after.output_len) == (before.prompt_len, before.output_len)
    assert clipped.describe()["num_clipped"] == too_long


def test_shared_prefix_token_ids_share_exactly_the_prefix():
    workload = shared_prefix_workload(50, seed=0, vocab_size=32000)
    prefix = workload.requests[0].prompt[:SHARED_PREFIX_LEN]
    user_parts = set()
    for request in workload.requests:
        assert request.prompt[:SHARED_PREFIX_LEN] == prefix
        assert len(request.prompt) == request.prompt_len
        assert 64 <= request.prompt_len - SHARED_PREFIX_LEN <= 256
        assert request.output_len == SHARED_PREFIX_OUTPUT_LEN
        user_parts.add(tuple(request.prompt[SHARED_PREFIX_LEN:]))
    assert len(user_parts) == 50
    # Another seed, another prefix.
    other = shared_prefix_workload(1, seed=1, vocab_size=32000).requests[0]
    assert other.prompt[:SHARED_PREFIX_LEN] != prefix


def test_shared_prefix_clipping_never_cuts_the_prefix():
    workload = shared_prefix_workload(50, seed=0, vocab_size=1000, max_model_len=700)
    prefix = workload.requests[0].prompt[:SHARED_PREFIX_LEN]
    assert workload.num_clipped > 0
    for request in workload.requests:
        assert request.prompt[:SHARED_PREFIX_LEN] == prefix
        assert request.prompt_len > SHARED_PREFIX_LEN
        assert request.prompt_len + request.output_len <= 700


def test_text_prompts_measure_their_length_with_the_tokenizer(tokenizer):
    workload = rag_workload(30, seed=0, tokenizer=tokenizer)
    token_ids = rag_workload(30, seed=0, vocab_size=1000)
    assert workload == rag_workload(30, seed=0, tokenizer=tokenizer)
    assert workload.params["prompt_form"] == "text"
    for text, ids in zip(workload.requests, token_ids.requests, strict=True):
        assert isinstance(text.prompt, str)
        assert text.prompt_len == len(tokenizer.encode(text.prompt, add_special_tokens=False))
        # Built to the same planned length as the token-id form, never longer.
        assert ids.prompt_len - 2 <= text.prompt_len <= ids.prompt_len
        assert text.output_len == ids.output_len


def test_shared_prefix_text_prompts_start_with_one_system_prompt(tokenizer):
    workload = shared_prefix_workload(20, seed=0, tokenizer=tokenizer)
    prompts = [r.prompt for r in workload.requests]
    assert all(isinstance(p, str) for p in prompts)
    assert len(set(prompts)) == 20
    # The common start can end inside a word, so allow it one token short of the prefix.
    same = itertools.takewhile(lambda chars: len(set(chars)) == 1, zip(*prompts, strict=False))
    common = "".join(chars[0] for chars in same)
    assert len(tokenizer.encode(common, add_special_tokens=False)) >= SHARED_PREFIX_LEN - 1
    for request in workload.requests:
        assert request.prompt_len == len(tokenizer.encode(request.prompt, add_special_tokens=False))
        assert SHARED_PREFIX_LEN + 60 <= request.prompt_len <= SHARED_PREFIX_LEN + 256


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_reads_requests_in_file_order(tmp_path):
    records = [{"prompt": f"p{i}", "prompt_len": 10 + i, "output_len": 5} for i in range(4)]
    path = write_jsonl(tmp_path / "w.jsonl", records)
    workload = jsonl_workload(path, 3)
    assert workload.requests == tuple(BenchRequest(f"p{i}", 10 + i, 5) for i in range(3))
    assert len(jsonl_workload(path).requests) == 4
    assert build_workload(str(path), 2).requests == workload.requests[:2]
    with pytest.raises(ValueError, match="only 4 usable requests"):
        jsonl_workload(path, 5)


def test_jsonl_clips_outputs_and_drops_prompts_that_cannot_fit(tmp_path, caplog):
    records = [
        {"prompt": "a", "prompt_len": 50, "output_len": 20},
        {"prompt": "b", "prompt_len": 90, "output_len": 20},
        {"prompt": "c", "prompt_len": 100, "output_len": 20},
        {"prompt": [1, 2, 3], "prompt_len": 999, "output_len": 20},
    ]
    workload = jsonl_workload(write_jsonl(tmp_path / "w.jsonl", records), max_model_len=100)
    assert workload.requests == (
        BenchRequest("a", 50, 20),
        BenchRequest("b", 90, 10),
        BenchRequest([1, 2, 3], 3, 20),
    )
    assert workload.num_clipped == 2
    assert "1 outputs shortened and 1 requests dropped" in caplog.text


def test_jsonl_measures_text_prompts_with_a_tokenizer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "ban ker", "prompt_len": 1, "output_len": 4}])
    (request,) = jsonl_workload(path, tokenizer=tokenizer).requests
    assert request.prompt_len == len(tokenizer.encode("ban ker", add_special_tokens=False))


def test_jsonl_rejects_malformed_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x", "output_len": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        jsonl_workload(path)


def test_build_workload_by_name():
    assert build_workload("rag", 5, 1, vocab_size=100) == rag_workload(5, 1, vocab_size=100)
    assert build_workload("shared-prefix", 5, 1, vocab_size=100).name == "shared-prefix"
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("sharegpt", 5)
    with pytest.raises(ValueError, match="number of requests"):
        build_workload("rag", None)


def test_outputs_are_capped_and_the_cap_is_recorded() -> None:
    workload = build_workload("rag", 20, seed=0)
    capped = cap_outputs(workload, 16)
    assert [r.output_len for r in capped.requests] == [min(r.output_len, 16) for r in workload.requests]
    assert [r.prompt for r in capped.requests] == [r.prompt for r in workload.requests]
    assert capped.params["max_output_len"] == 16
    assert cap_outputs(workload, None) is workload


def test_token_requests_round_trip() -> None:
    workload = rag_workload(30, seed=1)
    requests, num_capped = token_requests(workload, 100)
    assert num_capped == sum(r.output_len > 100 for r in workload.requests) > 0
    assert [(p, n) for p, n in requests] == [(list(r.prompt), min(r.output_len, 100)) for r in workload.requests]
    assert all(isinstance(t, int) for p, _ in requests for t in p)
    back = token_workload("again", requests, {"why": "test"})
    assert (back.name, back.params) == ("again", {"why": "test"})
    assert [(r.prompt, r.prompt_len, r.output_len) for r in back.requests] == [(p, len(p), n) for p, n in requests]


def test_random_prompts_are_seeded_and_distinct() -> None:
    prompts = random_prompts(8, 32, seed=3, vocab_size=1000)
    assert prompts == random_prompts(8, 32, seed=3, vocab_size=1000)
    assert len({tuple(p[:16]) for p in prompts}) == 8
    assert all(len(p) == 32 and min(p) >= 0 and max(p) < 1000 for p in prompts)
