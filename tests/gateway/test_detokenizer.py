from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from loomserve.gateway.detokenizer import IncrementalDetokenizer
from loomserve.gateway.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world! This is plain ASCII.",
    "Crème brûlée, naïve façade, Ærøskøbing, Straße",
    "日本語のテキストです。中文也可以。한국어 문장도.",
    "emoji 😀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 🤷🏽‍♀️ keycap 1️⃣ end",
    "😀😀😀🎉🎉中中中",
    "  leading spaces,\ttabs\t\tand\r\nwindows newlines\n\n\n   trailing   ",
    "def f(x: int) -> int:\n    return {'a': [x ** 2 for _ in range(3)]}  # ok\n",
    "مرحبا بالعالم — שלום עולם",
    "combining: e\u0301 a\u0308 zero\u200bwidth",
    "x",
]


def build_byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A small SentencePiece-style tokenizer: "▁" for spaces, a decoder that strips the
    leading space, and <0xNN> byte tokens for characters outside its vocabulary."""
    corpus = ["Hello world, this is a small corpus.", "The capital of France is Paris.",
              "Crème brûlée and a naïve façade"] * 5
    tokenizer = Tokenizer(BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    trainer = trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    # Byte tokens are ordinary vocabulary entries (not special tokens) in such models,
    # which BpeTrainer cannot produce; add them to the trained model directly.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def byte_level(default_model_path) -> PreTrainedTokenizerBase:
    return load_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def byte_fallback() -> PreTrainedTokenizerBase:
    return build_byte_fallback_tokenizer()


@pytest.fixture(params=["byte_level", "byte_fallback"])
def tokenizer(request) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(request.param)


def stream(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    pieces = []
    start = 0
    for size in sizes:
        pieces.append(detok.add_tokens(ids[start : start + size]))
        start += size
    assert start >= len(ids)
    pieces.append(detok.flush())
    return pieces


def random_sizes(rng: random.Random, total: int, largest: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(rng.randint(1, largest))
    return sizes


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, [1] * len(ids))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not [p for p in pieces if "\ufffd" in p]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", range(5))
def test_random_chunks(tokenizer, text, seed):
    rng = random.Random(seed)
    ids = tokenizer.encode(text, add_special_tokens=False)
    sizes = random_sizes(rng, len(ids), largest=rng.choice([2, 3, 5, 40]))
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, sizes)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not [p for p in pieces if "\ufffd" in p]


def test_long_output_of_multibyte_characters(tokenizer):
    # Long enough for the window to be cut back many times, with chunk boundaries
    # that keep falling inside characters.
    text = "🎉中é😀 " * 200
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, random_sizes(random.Random(7), len(ids), 3))
    assert "".join(pieces) == text
    assert not [p for p in pieces if "\ufffd" in p]


def test_text_containing_a_real_replacement_character(tokenizer):
    text = "before \ufffd after \ufffd"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(tokenizer), ids, [1] * len(ids))
    assert "".join(pieces) == tokenizer.decode(ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_random_token_ids_byte_level(byte_level, seed, skip_special_tokens):
    # Any token sequence, valid UTF-8 or not: a byte-level decode is local, so the
    # streamed text must equal the full decode exactly.
    rng = random.Random(seed)
    ids = [rng.randrange(len(byte_level)) for _ in range(rng.randint(1, 120))]
    prompt = [rng.randrange(len(byte_level)) for _ in range(6)]
    detok = IncrementalDetokenizer(byte_level, prompt, skip_special_tokens=skip_special_tokens)
    pieces = stream(detok, ids, random_sizes(rng, len(ids), 4))
    assert "".join(pieces) == byte_level.decode(ids, skip_special_tokens=skip_special_tokens)


def test_character_cut_off_at_the_end_is_released_by_flush(byte_level):
    emoji = byte_level.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1
    ids = byte_level.encode("ok ", add_special_tokens=False) + emoji[:-1]
    detok = IncrementalDetokenizer(byte_level)
    assert "".join(detok.add_tokens([i]) for i in ids) == "ok "
    held = detok.flush()
    assert "\ufffd" in held
    assert "ok " + held == byte_level.decode(ids)


def test_byte_tokens_cut_off_at_the_end_are_released_by_flush(byte_fallback):
    ids = byte_fallback.convert_tokens_to_ids(["<0xF0>", "<0x9F>"])
    detok = IncrementalDetokenizer(byte_fallback)
    assert detok.add_tokens(ids) == ""
    assert detok.flush() == byte_fallback.decode(ids) == "\ufffd\ufffd"


def test_invalid_bytes_are_not_held_forever(byte_level):
    continuation_byte = byte_level.encode("😀", add_special_tokens=False)[-1]
    ids = [continuation_byte] * 40
    detok = IncrementalDetokenizer(byte_level)
    streamed = [detok.add_tokens([i]) for i in ids]
    assert "".join(streamed)  # some of it came out before the end
    assert "".join(streamed) + detok.flush() == byte_level.decode(ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(byte_level, skip_special_tokens):
    ids = [*byte_level.encode("Hi", add_special_tokens=False), byte_level.eos_token_id,
           *byte_level.encode(" there", add_special_tokens=False)]
    detok = IncrementalDetokenizer(byte_level, skip_special_tokens=skip_special_tokens)
    text = "".join(stream(detok, ids, [1] * len(ids)))
    assert text == byte_level.decode(ids, skip_special_tokens=skip_special_tokens)
    assert text == ("Hi there" if skip_special_tokens else "Hi<|im_end|> there")


def test_prompt_context_changes_nothing_for_byte_level(byte_level):
    prompt = byte_level.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    ids = byte_level.encode(" Hello there 😀", add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(byte_level, prompt), ids, [1] * len(ids))
    assert "".join(pieces) == byte_level.decode(ids)


def test_prompt_context_keeps_the_leading_space(byte_fallback):
    full = byte_fallback.encode("The capital of France is Paris", add_special_tokens=False)
    prompt = byte_fallback.encode("The capital of France is", add_special_tokens=False)
    assert full[: len(prompt)] == prompt
    output = full[len(prompt) :]
    with_context = stream(IncrementalDetokenizer(byte_fallback, prompt), output, [1] * len(output))
    without = stream(IncrementalDetokenizer(byte_fallback), output, [1] * len(output))
    assert "".join(with_context) == " Paris"
    assert "".join(without) == byte_fallback.decode(output) == "Paris"


def test_prompt_ending_inside_a_character_is_not_used_as_context(byte_level):
    emoji = byte_level.encode("😀", add_special_tokens=False)
    output = emoji[1:] + byte_level.encode(" ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_level, emoji[:1])
    assert "".join(stream(detok, output, [1] * len(output))) == byte_level.decode(output)


def test_each_step_decodes_a_bounded_window(byte_level):
    decoded_lengths: list[int] = []

    class Recording:
        def decode(self, ids, **kwargs):
            decoded_lengths.append(len(ids))
            return byte_level.decode(ids, **kwargs)

    ids = byte_level.encode("word 中文 😀 " * 300, add_special_tokens=False)
    detok = IncrementalDetokenizer(Recording(), skip_special_tokens=True)  # type: ignore[arg-type]
    text = "".join(stream(detok, ids, [1] * len(ids)))
    assert text == byte_level.decode(ids)
    assert max(decoded_lengths) <= 24
    # Most steps need one decode; incomplete characters and window cuts add a few.
    assert len(decoded_lengths) < 3 * len(ids)
