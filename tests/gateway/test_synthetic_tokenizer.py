from __future__ import annotations

import numpy as np
import pytest

from loomserve.gateway.detokenizer import IncrementalDetokenizer
from loomserve.gateway.synthetic_tokenizer import (
    BOS,
    EOS,
    UNK,
    synthetic_tokenizer,
    synthetic_tokenizer_for,
    synthetic_vocabulary,
)
from loomserve.gateway.tokenizer import apply_chat_template
from loomserve.shared.dummy_shapes import DUMMY_SHAPES

LLAMA3 = DUMMY_SHAPES["llama-3.1-8b"]


@pytest.fixture(scope="module")
def llama3():
    tokenizer, eos = synthetic_tokenizer_for(LLAMA3, "llama-3.1-8b")
    return tokenizer, eos


@pytest.fixture(scope="module")
def tiny():
    tokenizer, _ = synthetic_tokenizer_for(DUMMY_SHAPES["llama-tiny"], "llama-tiny")
    return tokenizer


def word_ids(tokenizer, rng, n):
    """Random ids of plain word tokens (no special token, no ## piece, no [UNK])."""
    ids: list[int] = []
    while len(ids) < n:
        i = int(rng.integers(0, len(tokenizer)))
        token = tokenizer.convert_ids_to_tokens(i)
        if i not in tokenizer.all_special_ids and not token.startswith("##") and token != UNK:
            ids.append(i)
    return ids


def test_vocabulary_size_and_special_ids(llama3):
    tokenizer, eos = llama3
    assert len(tokenizer) == LLAMA3["vocab_size"] == 128256
    assert eos == [128001, 128008, 128009]
    assert tokenizer.bos_token_id == 128000 and tokenizer.eos_token_id == 128001
    assert tokenizer.convert_ids_to_tokens([128000, 128001, 128008, 128009]) == [BOS, EOS, "<|eos_2|>", "<|eos_3|>"]
    assert set(eos) <= set(tokenizer.all_special_ids)
    assert tokenizer.convert_ids_to_tokens(5000) == "t5000"
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "t128255"


def test_vocabulary_has_every_id_once():
    vocabulary = synthetic_vocabulary(512, 3, [0, 7])
    assert len(vocabulary) == len(set(vocabulary)) == 512
    assert vocabulary[3] == BOS and vocabulary[0] == EOS and vocabulary[7] == "<|eos_2|>"
    assert vocabulary[1] == UNK and vocabulary[2] == "a" and vocabulary[4] == "b"


def test_ids_round_trip_through_text(llama3):
    tokenizer, _ = llama3
    rng = np.random.default_rng(0)
    for n in (1, 2, 17, 300):
        ids = word_ids(tokenizer, rng, n)
        text = tokenizer.decode(ids)
        assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_text_round_trips_and_ids_are_in_range(llama3):
    tokenizer, _ = llama3
    for text in ("the capital of France is Paris", "t5000 t17 zebra crossing x = 1", "Hello , world !"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert all(0 <= i < len(tokenizer) for i in ids)
        assert UNK not in tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids) == text
    # Punctuation is split off as its own word; spacing is normalised, nothing is lost.
    assert tokenizer.decode(tokenizer.encode("Hello, world!", add_special_tokens=False)) == "Hello , world !"


def test_bos_is_prepended_and_special_tokens_skipped(llama3):
    tokenizer, _ = llama3
    ids = tokenizer.encode("t5000 t6000")
    assert ids == [128000, 5000, 6000]
    assert tokenizer.decode([5000, 128009, 6000], skip_special_tokens=True) == "t5000 t6000"
    assert tokenizer.decode([5000, 128009, 6000], skip_special_tokens=False) == "t5000 <|eos_3|> t6000"


def test_text_outside_ascii_becomes_unk(tiny):
    ids = tiny.encode("naïve t12", add_special_tokens=False)
    assert tiny.convert_ids_to_tokens(ids[0]) == UNK
    assert all(0 <= i < len(tiny) for i in ids)


def test_streamed_decode_equals_full_decode(tiny):
    """Random model output (## pieces and specials included) streams exactly as it decodes whole."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        prompt = rng.integers(0, len(tiny), 8).tolist()
        output = rng.integers(0, len(tiny), 40).tolist()
        output[5:8] = rng.integers(1, 190, 3).tolist()  # character pieces, glued together
        output[9] = DUMMY_SHAPES["llama-tiny"]["eos_token_id"][1]
        alone = IncrementalDetokenizer(tiny)
        assert "".join(alone.add_tokens([t]) for t in output) + alone.flush() == tiny.decode(
            output, skip_special_tokens=True)
        after_prompt = IncrementalDetokenizer(tiny, prompt)
        streamed = "".join(after_prompt.add_tokens(output[i:i + 3]) for i in range(0, 40, 3)) + after_prompt.flush()
        context = tiny.decode(prompt[-4:], skip_special_tokens=True)
        assert streamed == tiny.decode(prompt[-4:] + output, skip_special_tokens=True)[len(context):]


def test_chat_template_renders(tiny):
    ids = apply_chat_template(tiny, [{"role": "user", "content": "hi there"}])
    assert ids[0] == DUMMY_SHAPES["llama-tiny"]["bos_token_id"]
    assert tiny.decode(ids, skip_special_tokens=True) == "user : hi there assistant :"


def test_shape_errors():
    with pytest.raises(ValueError, match="too small"):
        synthetic_tokenizer(100, 1, [2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        synthetic_tokenizer(1000, 1, [5000])
    with pytest.raises(ValueError, match="EOS"):
        synthetic_tokenizer_for({"vocab_size": 1000})
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic_tokenizer_for({"eos_token_id": 2})


def test_gateway_uses_it_for_a_dummy_shape_name(tmp_path, monkeypatch):
    from loomserve.gateway.server import load_model_info, uses_synthetic_tokenizer
    from loomserve.shared.config import GatewayConfig
    from loomserve.shared.model_files import ModelFileError

    monkeypatch.chdir(tmp_path)
    info = load_model_info(GatewayConfig(model="llama-3.2-1b"))
    assert info.name == "llama-3.2-1b" and len(info.tokenizer) == 128256
    assert info.eos_token_ids == [128001, 128008, 128009]
    assert not uses_synthetic_tokenizer(GatewayConfig())
    # A directory with only a config.json, on request.
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text('{"vocab_size": 1000, "eos_token_id": 2}')
    info = load_model_info(GatewayConfig(model=str(tmp_path / "my-model"), tokenizer="synthetic"))
    assert info.name == "my-model" and len(info.tokenizer) == 1000 and info.eos_token_ids == [2]
    with pytest.raises(ModelFileError, match="dummy shape"):
        load_model_info(GatewayConfig(model="no-such-model", tokenizer="synthetic"))
