"""Deterministic, seeded request workloads for the serving benchmarks.

A workload is a list of ``BenchRequest``: a prompt (text, or token ids for models that have
no tokenizer, such as the dummy-weight ones), its length in tokens, and how many tokens to
generate. The same name, seed and options always give the same requests, and request ``i``
does not depend on how many requests were asked for, so a short run is a prefix of a long
one.

| workload          | prompt tokens                                   | output tokens                     |
|-------------------|-------------------------------------------------|-----------------------------------|
| ``rag``           | lognormal(median 270, sigma 1.2) in [16, 4096]  | lognormal(200, 1.1) in [8, 2048]  |
| ``shared-prefix`` | one shared 512-token prefix + a distinct 64-256 | 128                               |
| ``jsonl``         | from the file (prompt, prompt_len)              | from the file (output_len)        |

Output lengths are meant to be forced (the serving benchmark sends ``ignore_eos``).

With a maximum model length, every request is made to fit (prompt + output <= max length)
and the workload records how many requests that changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

SYNTHETIC_WORKLOADS = ("rag", "shared-prefix")

RAG_INPUT_MEDIAN = 270
RAG_INPUT_SIGMA = 1.2
RAG_INPUT_RANGE = (16, 4096)
RAG_OUTPUT_MEDIAN = 200
RAG_OUTPUT_SIGMA = 1.1
RAG_OUTPUT_RANGE = (8, 2048)

SHARED_PREFIX_LEN = 512
SHARED_PREFIX_USER_RANGE = (64, 256)
SHARED_PREFIX_OUTPUT_LEN = 128

# Every model family loomserve serves (Llama 2/3, Qwen2, Mistral, SmolLM2) has at least this
# many token ids, so random ids below it are valid prompts for any of them.
DEFAULT_VOCAB_SIZE = 32000

# Text prompts are built from whole words that the tokenizer maps to one token each, so that
# a prompt of n words is (almost always) n tokens; the pool is drawn from this many candidates.
_WORD_POOL_CANDIDATES = 8192
_TEXT_FIT_ATTEMPTS = 8


class TextTokenizer(Protocol):
    """The part of a Hugging Face tokenizer that text prompts need."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    # Hugging Face types decode as str | list[str]; one sequence in gives one str out.
    def decode(self, token_ids: list[int]) -> str | list[str]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Workload:
    """The requests of one benchmark run and the options that produced them."""

    name: str
    requests: tuple[BenchRequest, ...]
    params: dict[str, object] = field(default_factory=dict)
    num_clipped: int = 0  # requests shortened (or dropped, for jsonl) to fit max_model_len

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary, for the benchmark's result file."""
        prompt_lens = [r.prompt_len for r in self.requests]
        output_lens = [r.output_len for r in self.requests]
        return {
            "name": self.name,
            "num_requests": len(self.requests),
            "num_clipped": self.num_clipped,
            "params": self.params,
            "total_prompt_tokens": sum(prompt_lens),
            "total_output_tokens": sum(output_lens),
            "mean_prompt_len": float(np.mean(prompt_lens)) if prompt_lens else None,
            "mean_output_len": float(np.mean(output_lens)) if output_lens else None,
        }


def sample_lognormal_lengths(
    rng: np.random.Generator, n: int, median: float, sigma: float, bounds: tuple[int, int]
) -> list[int]:
    """n integer lengths from lognormal(ln median, sigma), rounded, then clipped to bounds."""
    raw = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return [int(x) for x in np.clip(np.rint(raw), bounds[0], bounds[1])]


def fit_lengths(
    prompt_len: int, output_len: int, max_model_len: int, min_prompt: int, min_output: int
) -> tuple[int, int]:
    """Shrink a (prompt, output) pair so that it fits in max_model_len tokens.

    Both shrink by the same factor, which keeps the prefill/decode balance of the request;
    neither goes below its minimum.
    """
    if prompt_len + output_len <= max_model_len:
        return prompt_len, output_len
    if min_prompt + min_output > max_model_len:
        raise ValueError(
            f"max_model_len {max_model_len} cannot hold even the smallest request of this "
            f"workload ({min_prompt} prompt + {min_output} output tokens); raise it"
        )
    new_prompt = max(min_prompt, prompt_len * max_model_len // (prompt_len + output_len))
    new_output = max(min_output, max_model_len - new_prompt)
    return max_model_len - new_output, new_output


def rag_workload(
    num_requests: int,
    seed: int = 0,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: TextTokenizer | None = None,
    max_model_len: int | None = None,
) -> Workload:
    """The headline mixed RAG workload: long-tailed prompts and outputs, outputs forced."""
    # One stream each for prompt lengths, output lengths and prompt contents, so that
    # request i does not depend on num_requests.
    input_rng, output_rng, prompt_rng = _streams(seed, 3)
    prompt_lens = sample_lognormal_lengths(input_rng, num_requests, RAG_INPUT_MEDIAN, RAG_INPUT_SIGMA, RAG_INPUT_RANGE)
    output_lens = sample_lognormal_lengths(
        output_rng, num_requests, RAG_OUTPUT_MEDIAN, RAG_OUTPUT_SIGMA, RAG_OUTPUT_RANGE
    )
    prompt_lens, output_lens, num_clipped = _fit_all(
        prompt_lens, output_lens, max_model_len, RAG_INPUT_RANGE[0], RAG_OUTPUT_RANGE[0]
    )
    builder = _PromptBuilder(prompt_rng, vocab_size, tokenizer, max_model_len)
    requests = [
        builder.request(builder.build(prompt_len), output_len)
        for prompt_len, output_len in zip(prompt_lens, output_lens, strict=True)
    ]
    return Workload(
        name="rag",
        requests=tuple(requests),
        params=_synthetic_params(seed, vocab_size, tokenizer, max_model_len),
        num_clipped=_report_clipped("rag", num_clipped, max_model_len),
    )


def shared_prefix_workload(
    num_requests: int,
    seed: int = 0,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: TextTokenizer | None = None,
    max_model_len: int | None = None,
) -> Workload:
    """Every prompt starts with the same 512-token system prompt (prefix-cache workload)."""
    length_rng, prompt_rng = _streams(seed, 2)
    low, high = SHARED_PREFIX_USER_RANGE
    user_lens = [int(x) for x in length_rng.integers(low, high + 1, size=num_requests)]
    prompt_lens = [SHARED_PREFIX_LEN + u for u in user_lens]
    output_lens = [SHARED_PREFIX_OUTPUT_LEN] * num_requests
    # The prefix itself is never cut: a shorter one would no longer be shared.
    prompt_lens, output_lens, num_clipped = _fit_all(prompt_lens, output_lens, max_model_len, SHARED_PREFIX_LEN + 1, 1)
    builder = _PromptBuilder(prompt_rng, vocab_size, tokenizer, max_model_len)
    prefix = builder.build(SHARED_PREFIX_LEN)
    requests = [
        builder.request(builder.join(prefix, builder.build(prompt_len - SHARED_PREFIX_LEN)), output_len)
        for prompt_len, output_len in zip(prompt_lens, output_lens, strict=True)
    ]
    params = _synthetic_params(seed, vocab_size, tokenizer, max_model_len)
    params["prefix_len"] = SHARED_PREFIX_LEN
    return Workload(
        name="shared-prefix",
        requests=tuple(requests),
        params=params,
        num_clipped=_report_clipped("shared-prefix", num_clipped, max_model_len),
    )


def jsonl_workload(
    path: str | Path,
    num_requests: int | None = None,
    *,
    tokenizer: TextTokenizer | None = None,
    max_model_len: int | None = None,
) -> Workload:
    """Requests read from a JSON-lines file with fields prompt, prompt_len and output_len.

    The first num_requests lines are used, in file order. Token-id prompts are counted, and
    given a tokenizer, text prompts are measured, instead of trusting the file's prompt_len.
    A prompt is never cut (text cannot be without a tokenizer), so to fit max_model_len only
    the output is shortened; a request whose prompt leaves no room for one output token is
    dropped.
    """
    path = Path(path)
    requests: list[BenchRequest] = []
    num_shortened = num_dropped = 0
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if num_requests is not None and len(requests) == num_requests:
                break
            if not line.strip():
                continue
            request = _parse_jsonl_request(line, f"{path}:{line_no}", tokenizer)
            if max_model_len is not None and request.prompt_len + request.output_len > max_model_len:
                room = max_model_len - request.prompt_len
                if room < 1:
                    num_dropped += 1
                    continue
                num_shortened += 1
                request = BenchRequest(request.prompt, request.prompt_len, room)
            requests.append(request)
    if num_shortened or num_dropped:
        logger.warning(
            "%s: to fit max_model_len=%s, %d outputs shortened and %d requests dropped",
            path,
            max_model_len,
            num_shortened,
            num_dropped,
        )
    if num_requests is not None and len(requests) < num_requests:
        raise ValueError(f"{path} holds only {len(requests)} usable requests, {num_requests} were asked for")
    return Workload(
        name="jsonl",
        requests=tuple(requests),
        params={
            "path": str(path),
            "tokenizer": _tokenizer_name(tokenizer),
            "max_model_len": max_model_len,
        },
        num_clipped=num_shortened + num_dropped,
    )


def build_workload(
    name: str,
    num_requests: int | None,
    seed: int = 0,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: TextTokenizer | None = None,
    max_model_len: int | None = None,
) -> Workload:
    """A workload by name: ``rag``, ``shared-prefix``, or the path of a .jsonl file."""
    if name in SYNTHETIC_WORKLOADS:
        if num_requests is None:
            raise ValueError(f"the {name} workload needs a number of requests")
        make = rag_workload if name == "rag" else shared_prefix_workload
        return make(
            num_requests,
            seed,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            max_model_len=max_model_len,
        )
    if name.endswith(".jsonl") or Path(name).is_file():
        return jsonl_workload(name, num_requests, tokenizer=tokenizer, max_model_len=max_model_len)
    raise ValueError(
        f"unknown workload {name!r}: use one of {', '.join(SYNTHETIC_WORKLOADS)} or the path of a .jsonl file"
    )


# A request as the in-process benchmarks hand it to an engine: (prompt token ids, output length).
TokenRequest = tuple[list[int], int]


def cap_outputs(workload: Workload, max_output_len: int | None) -> Workload:
    """The workload with every output capped at ``max_output_len`` (recorded in its params)."""
    if max_output_len is None:
        return workload
    requests = tuple(BenchRequest(r.prompt, r.prompt_len, min(r.output_len, max_output_len))
                     for r in workload.requests)
    return dataclasses.replace(workload, requests=requests,
                               params={**workload.params, "max_output_len": max_output_len})


def token_requests(workload: Workload, max_output_len: int) -> tuple[list[TokenRequest], int]:
    """A token-id workload's requests with outputs capped at ``max_output_len``, and how many
    the cap shortened."""
    requests = [([int(t) for t in r.prompt], min(r.output_len, max_output_len)) for r in workload.requests]
    return requests, sum(r.output_len > max_output_len for r in workload.requests)


def token_workload(name: str, requests: Sequence[TokenRequest], params: dict[str, object] | None = None) -> Workload:
    """Token-id requests as a workload, for ``bench.serving``."""
    return Workload(name, tuple(BenchRequest(p, len(p), n) for p, n in requests), params or {})


def random_prompts(count: int, length: int, seed: int, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[list[int]]:
    """Distinct random prompts: no two share a first block, so the prefix cache never hits."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(count, length)).tolist()


class _PromptBuilder:
    """Makes prompts of a given token count: random token ids, or text via a tokenizer."""

    def __init__(
        self,
        rng: np.random.Generator,
        vocab_size: int,
        tokenizer: TextTokenizer | None,
        max_model_len: int | None,
    ) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self._rng = rng
        self._vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._words = _single_token_words(tokenizer, rng) if tokenizer is not None else []

    def build(self, num_tokens: int) -> str | list[int]:
        if self._tokenizer is None:
            return self._rng.integers(0, self._vocab_size, size=num_tokens).tolist()
        return self._build_text(self._tokenizer, num_tokens)

    def join(self, prefix: str | list[int], user: str | list[int]) -> str | list[int]:
        if isinstance(prefix, list) and isinstance(user, list):
            return prefix + user
        return f"{prefix} {user}"

    def request(self, prompt: str | list[int], output_len: int) -> BenchRequest:
        """The request with its measured prompt length, still within max_model_len."""
        prompt_len = self._count(prompt)
        # Text can measure a token longer than planned where words merge at a join.
        if self._max_model_len is not None:
            output_len = min(output_len, self._max_model_len - prompt_len)
        return BenchRequest(prompt, prompt_len, output_len)

    def _build_text(self, tokenizer: TextTokenizer, num_tokens: int) -> str:
        words = self._sample_words(num_tokens)
        # A word can still merge with its neighbour or split in context: measure and
        # correct a few times, then trim until the text is no longer than asked.
        for _ in range(_TEXT_FIT_ATTEMPTS):
            excess = self._count(" ".join(words)) - num_tokens
            if excess == 0:
                break
            if excess < 0:
                words.extend(self._sample_words(-excess))
            else:
                del words[max(1, len(words) - excess) :]
        while len(words) > 1 and self._count(" ".join(words)) > num_tokens:
            words.pop()
        return " ".join(words)

    def _sample_words(self, n: int) -> list[str]:
        return [self._words[i] for i in self._rng.integers(0, len(self._words), size=n)]

    def _count(self, prompt: str | list[int]) -> int:
        if isinstance(prompt, list):
            return len(prompt)
        assert self._tokenizer is not None, "text prompts are only built with a tokenizer"
        return len(self._tokenizer.encode(prompt, add_special_tokens=False))


def _single_token_words(tokenizer: TextTokenizer, rng: np.random.Generator) -> list[str]:
    """Alphabetic words that stay one token after a space, from a seeded sample of ids."""
    vocab = len(tokenizer)
    candidates = rng.choice(vocab, size=min(vocab, _WORD_POOL_CANDIDATES), replace=False)
    anchor = len(tokenizer.encode("a", add_special_tokens=False))
    words: set[str] = set()
    for token_id in candidates:
        decoded = tokenizer.decode([int(token_id)])
        word = decoded.strip() if isinstance(decoded, str) else ""
        if len(word) < 2 or not (word.isascii() and word.isalpha()):
            continue
        if len(tokenizer.encode(f"a {word}", add_special_tokens=False)) == anchor + 1:
            words.add(word)
    if not words:
        raise ValueError("the tokenizer has no single-token words to build text prompts from")
    # Sorted, so that the pool (and every prompt) does not depend on set iteration order.
    return sorted(words)


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n)]


def _fit_all(
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    max_model_len: int | None,
    min_prompt: int,
    min_output: int,
) -> tuple[list[int], list[int], int]:
    if max_model_len is None:
        return list(prompt_lens), list(output_lens), 0
    fitted = [
        fit_lengths(p, o, max_model_len, min_prompt, min_output) for p, o in zip(prompt_lens, output_lens, strict=True)
    ]
    num_clipped = sum(f != (p, o) for f, p, o in zip(fitted, prompt_lens, output_lens, strict=True))
    return [p for p, _ in fitted], [o for _, o in fitted], num_clipped


def _report_clipped(what: str, num_clipped: int, max_model_len: int | None) -> int:
    if num_clipped:
        logger.warning(
            "%s: %d requests shortened to fit max_model_len=%s (prompt + output)",
            what,
            num_clipped,
            max_model_len,
        )
    return num_clipped


def _parse_jsonl_request(line: str, where: str, tokenizer: TextTokenizer | None) -> BenchRequest:
    try:
        record = json.loads(line)
        prompt = record["prompt"]
        prompt_len = int(record["prompt_len"])
        output_len = int(record["output_len"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: expected a JSON object with prompt, prompt_len and output_len ({exc})") from exc
    if isinstance(prompt, list):
        prompt_len = len(prompt)
    elif tokenizer is not None:
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
    if output_len < 1:
        raise ValueError(f"{where}: output_len must be at least 1, got {output_len}")
    return BenchRequest(prompt, prompt_len, output_len)


def _tokenizer_name(tokenizer: TextTokenizer | None) -> str | None:
    if tokenizer is None:
        return None
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _synthetic_params(
    seed: int, vocab_size: int, tokenizer: TextTokenizer | None, max_model_len: int | None
) -> dict[str, object]:
    return {
        "seed": seed,
        "prompt_form": "text" if tokenizer is not None else "token_ids",
        "vocab_size": None if tokenizer is not None else vocab_size,
        "tokenizer": _tokenizer_name(tokenizer),
        "max_model_len": max_model_len,
    }
