"""Where the sampling values for fields a request leaves out come from."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from loomserve.gateway.sampling_defaults import (
    DEFAULT_MODEL_SAMPLING,
    OPENAI_DEFAULTS,
    GenerationConfigError,
    load_sampling_defaults,
)


def _hf_dir(tmp_path: Path, generation_config: dict[str, object] | None) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    if generation_config is not None:
        (model / "generation_config.json").write_text(json.dumps(generation_config))
    return model


def _gguf_file(tmp_path: Path, sampling: dict[str, float | int]) -> Path:
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in sampling.items():
        if isinstance(value, int):
            writer.add_int32(key, value)
        else:
            writer.add_float32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_hugging_face_generation_config_sets_the_declared_fields_only(tmp_path: Path) -> None:
    # Qwen2.5-7B-Instruct's generation_config.json, less its token ids.
    model = _hf_dir(tmp_path, {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8,
                               "top_k": 20, "bos_token_id": 151643, "transformers_version": "4.37.0"})
    defaults = load_sampling_defaults("auto", model)
    assert defaults.declared == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert defaults.values == {**OPENAI_DEFAULTS, **defaults.declared}
    assert defaults.values["min_p"] == 0.0
    assert defaults.describe() == ("temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05 "
                                   "(generation_config.json; other fields as OpenAI's)")


@pytest.mark.parametrize("generation_config", [None, {"bos_token_id": 1, "eos_token_id": 2}])
def test_a_model_that_declares_nothing_keeps_openais_defaults(tmp_path: Path,
                                                              generation_config: dict[str, object] | None) -> None:
    defaults = load_sampling_defaults("auto", _hf_dir(tmp_path, generation_config))
    assert defaults.declared == {} and defaults.values == OPENAI_DEFAULTS
    assert defaults.describe() == "OpenAI's (the model declares none)"


def test_gguf_sampling_metadata_is_read(tmp_path: Path) -> None:
    path = _gguf_file(tmp_path, {"general.sampling.temp": 0.5, "general.sampling.top_k": 40,
                                 "general.sampling.penalty_repeat": 1.1})
    declared = load_sampling_defaults("auto", path).declared
    assert declared == pytest.approx({"temperature": 0.5, "top_k": 40, "repetition_penalty": 1.1})
    assert isinstance(declared["top_k"], int)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_sampling_defaults("auto", _gguf_file(empty, {})).declared == {}


def test_the_default_model_gets_its_model_cards_values(default_model_path: Path) -> None:
    defaults = load_sampling_defaults("auto", default_model_path)
    assert defaults.declared == DEFAULT_MODEL_SAMPLING == {"temperature": 0.2, "top_p": 0.9}
    assert "default model's card" in defaults.describe()


def test_none_and_a_file_override_what_the_model_declares(tmp_path: Path, default_model_path: Path) -> None:
    assert load_sampling_defaults("none", default_model_path).values == OPENAI_DEFAULTS
    assert load_sampling_defaults("auto", None).values == OPENAI_DEFAULTS  # a dummy shape
    own = tmp_path / "sampling.json"
    own.write_text(json.dumps({"temperature": 0, "top_k": -1, "min_p": 0.05}))
    assert load_sampling_defaults(str(own), default_model_path).declared == {"temperature": 0.0, "top_k": 0,
                                                                              "min_p": 0.05}


@pytest.mark.parametrize(("content", "needle"), [
    ('{"temperature": 3}', "temperature=3 is out of range"),
    ('{"top_p": 0}', "top_p=0 is out of range"),
    ('{"top_k": 2.5}', "top_k=2.5 is out of range"),
    ('{"temperature": "hot"}', "temperature must be a number"),
    ('{"repetition_penalty": true}', "repetition_penalty must be a number"),
    ("[0.7]", "must hold a JSON object"),
    ("{", "cannot read"),
])
def test_a_bad_generation_config_is_refused_with_the_reason(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GenerationConfigError, match=needle):
        load_sampling_defaults(str(path), None)
    model = _hf_dir(tmp_path, None)
    (model / "generation_config.json").write_text(content)
    with pytest.raises(GenerationConfigError, match=needle):
        load_sampling_defaults("auto", model)


def test_a_missing_generation_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GenerationConfigError, match="cannot read"):
        load_sampling_defaults(str(tmp_path / "absent.json"), None)
