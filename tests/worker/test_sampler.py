"""The sampler against straightforward one-row references written here.

The references handle one row at a time and loop over token ids in plain
Python, so they are slow but obviously right; the sampler must agree with them
exactly where arithmetic allows (logit adjustments, logprobs, allowed sets) and
in distribution where it draws.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from typing import Any

import pytest
import torch

from loomserve.shared.messages import SamplingParams
from loomserve.worker.sampler import SamplingState, adjust_logits, sample, sample_async

F32 = torch.float32


def make_state(
    prompt: list[int] | None = None,
    outputs: list[int] | None = None,
    device: str = "cpu",
    **params: Any,
) -> SamplingState:
    sampling = SamplingParams(max_tokens=64, **params)
    return SamplingState(sampling, prompt or [], outputs or [], device=device)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale  # (rows, V)


def f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F32)


# --- references --------------------------------------------------------------


def ref_adjust(row: torch.Tensor, p: SamplingParams, prompt: list[int], outputs: list[int]) -> torch.Tensor:
    """Bias, min_tokens, repetition, frequency/presence on one row (V,), token by token."""
    row = row.clone()
    for tok, bias in (p.logit_bias or {}).items():
        row[tok] = row[tok] + f32(bias)
    if len(outputs) < p.min_tokens:
        for tok in p.stop_token_ids:
            row[tok] = float("-inf")
    if p.repetition_penalty != 1.0:
        penalty = f32(p.repetition_penalty)
        for tok in set(prompt) | set(outputs):
            row[tok] = row[tok] / penalty if row[tok] > 0 else row[tok] * penalty
    for tok, count in Counter(outputs).items():
        row[tok] = row[tok] - (f32(count) * f32(p.frequency_penalty) + f32(p.presence_penalty))
    return row


def ref_allowed(row: torch.Tensor, p: SamplingParams) -> list[int]:
    """Tokens a sampled row may produce: temperature, top-k, top-p, min-p on one row (V,)."""
    x = (row / f32(p.temperature)).tolist()
    vocab = len(x)
    allowed = set(range(vocab))
    if 0 < p.top_k < vocab:
        kth = sorted(x, reverse=True)[p.top_k - 1]
        allowed = {t for t in allowed if x[t] >= kth}
    masked = [x[t] if t in allowed else float("-inf") for t in range(vocab)]
    probs = torch.tensor(masked, dtype=F32).softmax(dim=0).tolist()
    if p.top_p < 1.0:
        nucleus: list[int] = []
        mass = 0.0
        for t in sorted(allowed, key=lambda t: -probs[t]):
            nucleus.append(t)
            mass += probs[t]
            if mass >= p.top_p:
                break
        smallest = min(probs[t] for t in nucleus)
        allowed = {t for t in allowed if probs[t] >= smallest}
    if p.min_p > 0.0:
        cutoff = p.min_p * max(probs[t] for t in allowed)
        allowed = {t for t in allowed if probs[t] >= cutoff}
    return sorted(allowed)


def ref_distribution(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Renormalised probabilities (V,) float64 a sampled row is drawn from."""
    allowed = ref_allowed(row, p)
    x = row.double() / p.temperature
    weights = torch.zeros_like(x)
    weights[allowed] = (x[allowed] - x[allowed].max()).exp()
    return weights / weights.sum()


def histogram(tokens: list[int], vocab: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    return counts / counts.sum()


# --- greedy ------------------------------------------------------------------


def test_greedy_equals_argmax() -> None:
    logits = random_logits(8, 1000, seed=0)
    out = sample(logits, [make_state(temperature=0.0) for _ in range(8)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_rows_unaffected_by_sampled_rows() -> None:
    logits = random_logits(12, 500, seed=1)
    before = logits.clone()
    kinds: list[dict[str, Any]] = [
        {"temperature": 0.0},
        {"temperature": 1.3, "top_p": 0.8, "top_k": 40, "min_p": 0.02, "seed": 5},
        {"temperature": 0.7, "logprobs": 2},
    ]
    states = [make_state(**kinds[i % 3]) for i in range(12)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        out = sample(logits, states, gen)
        for i in range(0, 12, 3):
            assert out.token_ids[i] == int(logits[i].argmax())
    assert torch.equal(logits, before)


def test_empty_batch() -> None:
    out = sample(torch.empty(0, 10), [])
    assert out.token_ids == [] and out.logprobs == []


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 5), [make_state()])


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"logprobs": -1},
        {"min_tokens": -1},
    ],
)
def test_invalid_params_rejected(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_state(**params)


# --- truncation: allowed sets and distributions --------------------------------

TRUNCATIONS: list[dict[str, Any]] = [
    {"top_k": 5},
    {"top_p": 0.7},
    {"min_p": 0.1},
    {"top_k": 20, "top_p": 0.9},
    {"top_p": 0.5, "min_p": 0.05},
    {"top_k": 8, "top_p": 0.95, "min_p": 0.2},
    {"top_k": 3, "min_p": 0.3},
]


def test_sampled_tokens_inside_reference_allowed_set() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab = 64
    for trial in range(20):
        logits = random_logits(len(TRUNCATIONS) * 3, vocab, seed=100 + trial, scale=1 + trial % 4)
        params: list[dict[str, Any]] = [
            {**TRUNCATIONS[i % len(TRUNCATIONS)], "temperature": (0.5, 1.0, 2.0)[i % 3]} for i in range(logits.shape[0])
        ]
        states = [make_state(**p) for p in params]
        allowed = [ref_allowed(logits[i], s.params) for i, s in enumerate(states)]
        for _ in range(10):
            out = sample(logits, states, gen)
            for i, token in enumerate(out.token_ids):
                assert token in allowed[i], (trial, params[i], token, allowed[i])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(
    "truncation",
    [{}, *TRUNCATIONS, {"top_k": 100, "top_p": 1.0}],
)
def test_empirical_distribution_matches_reference(temperature: float, truncation: dict[str, Any]) -> None:
    vocab, draws = 8, 20_000
    row = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.0, -0.7, -1.5])  # (V,)
    state = make_state(temperature=temperature, **truncation)
    states = [state] * draws
    out = sample(row.expand(draws, vocab), states, torch.Generator().manual_seed(3))
    expected = ref_distribution(row, state.params)
    assert (expected[histogram(out.token_ids, vocab) > 0] > 0).all()
    total_variation = 0.5 * (histogram(out.token_ids, vocab) - expected).abs().sum()
    assert total_variation < 0.02, (expected, histogram(out.token_ids, vocab))


@pytest.mark.parametrize(("scale", "largest_nucleus"), [(1.0, (1025, 4096)), (2.0, (65, 1024)), (4.0, (1, 64))])
def test_top_p_with_large_vocabulary_matches_reference(scale: float, largest_nucleus: tuple[int, int]) -> None:
    # On CPU a nucleus is looked for among the 64 likeliest tokens, then 1024,
    # then all: the logit scale decides which stage the largest nucleus needs.
    vocab = 4096
    logits = random_logits(4, vocab, seed=4, scale=scale)
    states = [make_state(top_p=0.9), make_state(top_p=0.5, top_k=3000), make_state(top_p=0.3), make_state()]
    allowed = [set(ref_allowed(logits[i], s.params)) for i, s in enumerate(states)]
    assert largest_nucleus[0] <= max(len(a) for a in allowed[:3]) <= largest_nucleus[1]
    gen = torch.Generator().manual_seed(6)
    for _ in range(50):
        out = sample(logits, states, gen)
        assert all(t in allowed[i] for i, t in enumerate(out.token_ids))


# --- seeds -------------------------------------------------------------------


def step_logits(step: int, vocab: int) -> torch.Tensor:
    return random_logits(1, vocab, seed=1000 + step, scale=1.0)[0]  # (V,)


def run_seeded(
    seed: int, companions: list[dict[str, Any]], position: int, steps: int = 12, device: str = "cpu"
) -> list[int]:
    """Tokens of a seeded request over ``steps`` steps, batched with ``companions``."""
    vocab = 300
    target = make_state(prompt=[1, 2, 3], device=device, temperature=0.9, top_p=0.95, seed=seed)
    others = [make_state(device=device, **c) for c in companions]
    gen = torch.Generator(device=device).manual_seed(position)
    for step in range(steps):
        states = [*others[:position], target, *others[position:]]
        rows = [random_logits(1, vocab, seed=50 * step + j)[0] for j in range(len(states))]
        rows[position] = step_logits(step, vocab)
        out = sample(torch.stack(rows).to(device), states, gen)
        for st, token in zip(states, out.token_ids, strict=True):
            st.append_output(token)
    return target.output_token_ids


BUSY: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 1.0, "top_k": 5, "seed": 99},
    {"temperature": 1.5, "min_p": 0.1, "repetition_penalty": 1.2, "logprobs": 3},
    {"temperature": 0.8},
]


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    alone = run_seeded(7, [], 0)
    assert run_seeded(7, BUSY, 2) == alone
    assert run_seeded(7, BUSY[::-1], 4) == alone
    assert run_seeded(7, BUSY[1:2], 0) == alone


def test_different_seeds_differ() -> None:
    assert run_seeded(7, [], 0) != run_seeded(8, [], 0)


def test_resumed_seeded_request_continues_identically() -> None:
    vocab = 300
    params: dict[str, Any] = {"temperature": 1.0, "seed": 11}
    whole = make_state(**params)
    for step in range(10):
        whole.append_output(sample(step_logits(step, vocab)[None], [whole]).token_ids[0])
    resumed = make_state(outputs=whole.output_token_ids[:6], **params)
    for step in range(6, 10):
        resumed.append_output(sample(step_logits(step, vocab)[None], [resumed]).token_ids[0])
    assert resumed.output_token_ids == whole.output_token_ids


# --- penalties, bias, min_tokens ------------------------------------------------

PENALISED: list[dict[str, Any]] = [
    {"presence_penalty": 0.7},
    {"frequency_penalty": 0.45},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8, "frequency_penalty": -0.3, "presence_penalty": 1.1},
    {"logit_bias": {3: 5.5, 17: -100.0, 40: 0.3}},
    {"logit_bias": {9: 2.0}, "repetition_penalty": 1.7, "presence_penalty": -0.4},
    {"min_tokens": 5, "stop_token_ids": [0, 33], "frequency_penalty": 0.2},
    {},
]


def penalised_batch(vocab: int) -> tuple[torch.Tensor, list[SamplingState]]:
    gen = torch.Generator().manual_seed(8)
    states = []
    for i, params in enumerate(PENALISED):
        prompt = torch.randint(0, vocab, (5 + 3 * i,), generator=gen).tolist()
        outputs = [*torch.randint(0, vocab, (2 * i,), generator=gen).tolist(), 4, 4, 4]
        states.append(make_state(prompt, outputs, temperature=0.0, logprobs=4, **params))
    return random_logits(len(states), vocab, seed=9), states


def test_adjustments_equal_reference_exactly() -> None:
    logits, states = penalised_batch(vocab=50)
    before = logits.clone()
    adjusted = adjust_logits(logits, states)
    for i, st in enumerate(states):
        expected = ref_adjust(logits[i], st.params, st.prompt_token_ids, st.output_token_ids)
        assert torch.equal(adjusted[i], expected), (i, st.params)
    assert torch.equal(logits, before)


def test_penalised_row_leaves_the_others_untouched() -> None:
    logits = random_logits(4, 50, seed=10)
    states = [
        make_state([1, 2], [3, 3]),
        make_state([1, 2], [3, 3], repetition_penalty=2.0, frequency_penalty=1.0),
        make_state([1, 2], [3, 3], logit_bias={7: 3.0}),
        make_state([1, 2], [3, 3], min_tokens=9, stop_token_ids=[5]),
    ]
    adjusted = adjust_logits(logits, states)
    assert torch.equal(adjusted[0], logits[0])
    for i in (1, 2, 3):
        assert not torch.equal(adjusted[i], logits[i])
        others = [j for j in range(4) if j != i]
        alone = adjust_logits(logits[others], [states[j] for j in others])
        assert torch.equal(alone[others.index(0)], logits[0])


def test_penalties_steer_greedy_and_logprobs() -> None:
    logits, states = penalised_batch(vocab=50)
    out = sample(logits, states)
    for i, st in enumerate(states):
        expected = ref_adjust(logits[i], st.params, st.prompt_token_ids, st.output_token_ids)
        assert out.token_ids[i] == int(expected.argmax())
        lp = out.logprobs[i]
        assert lp is not None
        ref = expected.log_softmax(dim=0)
        assert lp.logprob == pytest.approx(float(ref[out.token_ids[i]]), abs=1e-6)


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    vocab = 20
    row = torch.zeros(vocab)
    row[5], row[6], row[7] = 10.0, 9.0, 1.0  # (V,): stop ids 5 and 6 are the likeliest
    greedy = make_state(temperature=0.0, min_tokens=2, stop_token_ids=[5, 6])
    sampled = make_state(temperature=1.0, min_tokens=2, stop_token_ids=[5, 6])
    gen = torch.Generator().manual_seed(12)
    for _ in range(2):
        out = sample(row.expand(50, vocab), [greedy] + [sampled] * 49, gen)
        assert out.token_ids[0] == 7
        assert not {5, 6} & set(out.token_ids)
        greedy.append_output(out.token_ids[0])
        sampled.append_output(out.token_ids[1])
    assert sample(row[None], [greedy]).token_ids == [5]


def test_out_of_vocabulary_ids_ignored_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    logits = random_logits(1, 10, seed=13)
    state = make_state(logit_bias={2: 1.0, 10: 5.0}, min_tokens=3, stop_token_ids=[4, 99])
    with caplog.at_level(logging.WARNING, logger="loomserve.worker.sampler"):
        adjusted = adjust_logits(logits, [state])
    expected = logits[0].clone()
    expected[2] += 1.0
    expected[4] = float("-inf")
    assert torch.equal(adjusted[0], expected)
    assert "outside the vocabulary" in caplog.text


# --- logprobs ------------------------------------------------------------------


def test_logprobs_values_and_alternatives() -> None:
    vocab = 200
    logits = random_logits(6, vocab, seed=14)
    states = [
        make_state(temperature=0.0, logprobs=5),
        make_state(temperature=1.0, logprobs=3, top_k=10, seed=1),
        make_state(temperature=0.5, logprobs=0),
        make_state(temperature=0.0),
        make_state(temperature=2.0, logprobs=1, repetition_penalty=1.5, seed=2),
        make_state(temperature=0.0, logprobs=1000),
    ]
    out = sample(logits, states, torch.Generator().manual_seed(15))
    assert out.logprobs[3] is None
    for i, st in enumerate(states):
        lp = out.logprobs[i]
        if lp is None:
            continue
        ref = ref_adjust(logits[i], st.params, [], []).log_softmax(dim=0)  # (V,)
        assert lp.logprob == pytest.approx(float(ref[out.token_ids[i]]), abs=1e-6)
        k = min(st.params.logprobs or 0, vocab)
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == k
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.top_token_ids == ref.topk(k).indices.tolist()
        assert lp.top_logprobs == pytest.approx(ref.topk(k).values.tolist(), abs=1e-6)
    assert out.logprobs[2] is not None and out.logprobs[2].top_token_ids == []


def test_logprob_of_sampled_token_outside_the_top_alternatives() -> None:
    vocab = 100
    logits = random_logits(1, vocab, seed=16, scale=0.5)
    ref = logits[0].log_softmax(dim=0)
    state = make_state(temperature=1.0, logprobs=1, seed=17)
    outside = 0
    for _ in range(20):
        out = sample(logits, [state])
        lp = out.logprobs[0]
        assert lp is not None
        assert lp.logprob == pytest.approx(float(ref[out.token_ids[0]]), abs=1e-6)
        assert lp.top_token_ids == [int(ref.argmax())]
        outside += out.token_ids[0] not in lp.top_token_ids
    assert outside > 0


# --- edge cases ------------------------------------------------------------------


def test_top_k_larger_than_vocabulary_keeps_everything() -> None:
    vocab = 6
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    out = sample(row.expand(20_000, vocab), [make_state(top_k=1000)] * 20_000)
    expected = row.double().softmax(dim=0)
    assert 0.5 * (histogram(out.token_ids, vocab) - expected).abs().sum() < 0.02


def test_tiny_top_p_and_tiny_temperature_take_the_argmax() -> None:
    logits = random_logits(16, 500, seed=18)
    argmax = logits.argmax(dim=-1).tolist()
    cases: list[dict[str, Any]] = [{"top_p": 1e-6}, {"temperature": 1e-4}, {"temperature": 1e-5}]
    for params in cases:
        states = [make_state(**params) for _ in range(16)]
        for _ in range(5):
            assert sample(logits, states).token_ids == argmax


def test_single_finite_logit_always_wins() -> None:
    vocab = 30
    row = torch.full((vocab,), float("-inf"))
    row[21] = -3.0  # (V,): one token possible
    states = [
        make_state(temperature=0.0, logprobs=2),
        make_state(temperature=1.0, logprobs=2),
        make_state(temperature=2.0, top_p=0.5, top_k=3, min_p=0.5, seed=1),
        make_state(temperature=0.7, repetition_penalty=1.5, presence_penalty=1.0, outputs=[21]),
    ]
    for _ in range(20):
        out = sample(row.expand(len(states), vocab), states)
        assert out.token_ids == [21] * len(states)
        for lp in out.logprobs[:2]:
            assert lp is not None and lp.logprob == 0.0 and lp.top_token_ids[0] == 21
            assert lp.top_logprobs[1] == -math.inf


# --- CUDA ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_waits_only_for_the_copy_of_its_picks() -> None:
    """On CUDA ``sample_async`` queues everything and returns (the tokens stay on the device);
    ``result`` waits for one event, after the copy of the picks to pinned memory. Neither
    makes an implicit synchronisation."""
    logits, cpu_states = penalised_batch(vocab=50)
    cuda_states = [
        SamplingState(st.params, st.prompt_token_ids, st.output_token_ids, device="cuda") for st in cpu_states
    ]
    assert torch.equal(adjust_logits(logits.cuda(), cuda_states).cpu(), adjust_logits(logits, cpu_states))
    mixed = [
        *cuda_states,
        make_state(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=5, device="cuda"),
        make_state(temperature=1.2, top_p=0.7, logprobs=2, device="cuda"),
    ]
    mixed_logits = torch.cat([logits, random_logits(2, 50, seed=19)]).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    sample(mixed_logits, mixed, gen)  # warm-up: pinned memory, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            pending = sample_async(mixed_logits, mixed, gen)
            assert pending.tokens.is_cuda and pending._ready is not None
            out = pending.result()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert syncs == [], [str(w.message) for w in syncs]
    assert out.token_ids == pending.tokens.tolist() and out.logprobs[-1] is not None
    cpu_out = sample(logits, cpu_states)
    assert out.token_ids[: len(cpu_states)] == cpu_out.token_ids

    alone = run_seeded(7, [], 0, device="cuda")
    assert run_seeded(7, BUSY, 2, device="cuda") == alone
    assert run_seeded(7, BUSY[::-1], 4, device="cuda") == alone
