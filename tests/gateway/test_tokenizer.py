from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from loomserve.gateway.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer
from loomserve.shared.model_files import ModelFileError


@pytest.fixture(scope="module")
def cache(default_model_path, tmp_path_factory) -> Iterator[Path]:
    """A private cache dir, so the test neither uses nor depends on the machine's."""
    root = tmp_path_factory.mktemp("loomserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOMSERVE_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def gguf_tokenizer(cache, default_model_path) -> PreTrainedTokenizerBase:
    # The one slow conversion of this module (several seconds).
    return load_tokenizer(default_model_path)


def cached_entries(cache: Path) -> list[Path]:
    return [p for p in (cache / "tokenizers").iterdir() if not p.name.startswith(".")]


def test_gguf_tokenizer_is_converted_once_and_cached(
    cache, gguf_tokenizer, default_model_path, monkeypatch
):
    [entry] = cached_entries(cache)
    assert (entry / "tokenizer.json").is_file()
    assert Path(gguf_tokenizer.name_or_path) == entry

    def no_conversion(*args):
        raise AssertionError("converted the GGUF again instead of using the cache")

    monkeypatch.setattr("loomserve.gateway.tokenizer._convert_gguf", no_conversion)
    start = time.perf_counter()
    again = load_tokenizer(default_model_path)
    elapsed = time.perf_counter() - start
    assert Path(again.name_or_path) == entry
    assert elapsed < 5.0, f"loading from the cache took {elapsed:.1f} s"
    assert cached_entries(cache) == [entry]
    text = "Hello, wörld! 😀 def f(): pass"
    assert again.encode(text) == gguf_tokenizer.encode(text)
    assert again.chat_template == gguf_tokenizer.chat_template


@pytest.mark.slow
def test_damaged_cache_entry_is_rebuilt(cache, gguf_tokenizer, default_model_path, tmp_path):
    # Slow: a second conversion. Rebuild in a copy so the module's entry stays intact.
    [entry] = cached_entries(cache)
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (copy / "tokenizers" / entry.name / "tokenizer.json").write_text("{not json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOMSERVE_CACHE_DIR", str(copy))
        rebuilt = load_tokenizer(default_model_path)
    assert rebuilt.encode("Hello there") == gguf_tokenizer.encode("Hello there")
    assert json.loads((copy / "tokenizers" / entry.name / "tokenizer.json").read_text())


def test_gguf_eos(gguf_tokenizer, default_model_path):
    assert gguf_tokenizer.eos_token == "<|im_end|>"
    assert eos_token_ids(gguf_tokenizer, default_model_path) == [2]


def test_chat_template_user_message(gguf_tokenizer):
    ids = apply_chat_template(gguf_tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    assert isinstance(ids, list)
    assert all(isinstance(i, int) for i in ids)
    text = gguf_tokenizer.decode(ids)
    # SmolLM2's template adds its default system prompt when none is given.
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_system_and_user(gguf_tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
    ]
    ids = apply_chat_template(gguf_tokenizer, messages)
    assert gguf_tokenizer.decode(ids) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = apply_chat_template(gguf_tokenizer, messages, add_generation_prompt=False)
    assert ids[: len(without_prompt)] == without_prompt
    assert len(without_prompt) < len(ids)


def test_chat_template_missing(gguf_tokenizer, tmp_path):
    gguf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    plain = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(plain, [{"role": "user", "content": "hi"}])
    explicit = apply_chat_template(
        plain, [{"role": "user", "content": "hi"}],
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    assert plain.decode(explicit) == "hi"


def test_hf_directory_with_generation_config(gguf_tokenizer, tmp_path):
    gguf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 2]}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("Hello there") == gguf_tokenizer.encode("Hello there")
    assert eos_token_ids(tokenizer, tmp_path) == [2, 0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert eos_token_ids(tokenizer, tmp_path) == [2, 7]
    (tmp_path / "generation_config.json").unlink()
    assert eos_token_ids(tokenizer, tmp_path) == [2]


def test_not_a_model(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelFileError):
        load_tokenizer(not_gguf)
    with pytest.raises(ModelFileError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelFileError):
        load_tokenizer(tmp_path)  # a directory without tokenizer files
