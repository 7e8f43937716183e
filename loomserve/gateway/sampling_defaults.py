"""The sampling values a request gets for the fields it leaves out.

OpenAI's defaults (temperature 1, top_p 1, no top_k, min_p or repetition penalty) suit
large chat models; a small one sampled at temperature 1 rambles. As vLLM does, the
gateway takes what the model declares instead (``--generation-config auto``):

| model                | where its values are read                                   |
|----------------------|-------------------------------------------------------------|
| Hugging Face folder  | ``generation_config.json``                                  |
| GGUF file            | its ``general.sampling.*`` metadata (llama.cpp's keys)      |
| the default model    | ``DEFAULT_MODEL_SAMPLING`` below (its GGUF declares none)   |

``--generation-config none`` keeps OpenAI's defaults; a path to a JSON file with the
same keys as ``generation_config.json`` sets them. Fields a request sends always win.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf

from loomserve.shared.model_files import DEFAULT_MODEL_FILE

log = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
OPENAI_DEFAULTS: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                     "repetition_penalty": 1.0}
# SmolLM2-135M-Instruct's model card samples with these ("How to use": model.generate(...,
# temperature=0.2, top_p=0.9, do_sample=True)), https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct;
# its generation_config.json and the GGUF file name none.
DEFAULT_MODEL_SAMPLING: dict[str, float] = {"temperature": 0.2, "top_p": 0.9}
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}


@dataclass(frozen=True)
class SamplingDefaults:
    """OpenAI's defaults overlaid with ``declared``, the values ``source`` names."""

    declared: dict[str, float]
    source: str

    @property
    def values(self) -> dict[str, float]:
        return {**OPENAI_DEFAULTS, **self.declared}

    def describe(self) -> str:
        if not self.declared:
            return f"OpenAI's ({self.source})"
        shown = ", ".join(f"{k}={v:g}" for k, v in self.declared.items())
        return f"{shown} ({self.source}; other fields as OpenAI's)"


class GenerationConfigError(ValueError):
    """A ``--generation-config`` file that cannot be used; the message says why."""


def _checked(values: dict[str, object], source: str) -> dict[str, float]:
    """The known fields of ``values`` as numbers in the ranges requests are held to."""
    out: dict[str, float] = {}
    for name in FIELDS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GenerationConfigError(f"{source}: {name} must be a number, not {value!r}")
        ok = {"temperature": 0 <= value <= 2, "top_p": 0 < value <= 1, "top_k": value == int(value) and value >= -1,
              "min_p": 0 <= value <= 1, "repetition_penalty": 0 < value <= 10}[name]
        if not ok:
            raise GenerationConfigError(f"{source}: {name}={value} is out of range")
        out[name] = int(value) if name == "top_k" else float(value)
    if out.get("top_k") == -1:  # "off" in vLLM's and HF's spelling; 0 means off here
        out["top_k"] = 0
    return out


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GenerationConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise GenerationConfigError(f"{path} must hold a JSON object")
    return data


def _gguf_sampling(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    found: dict[str, object] = {}
    for key, name in _GGUF_KEYS.items():
        field = reader.fields.get(key)
        if field is not None:
            found[name] = field.contents()
    return found


def load_sampling_defaults(setting: str, model_path: Path | None) -> SamplingDefaults:
    """``setting`` is ``auto``, ``none`` or a JSON file; ``model_path`` is None for models
    with no files of their own (a dummy shape)."""
    if setting == "none":
        return SamplingDefaults({}, "--generation-config none")
    if setting != "auto":
        path = Path(setting).expanduser()
        return SamplingDefaults(_checked(_read_json(path), str(path)), str(path))
    if model_path is None:
        return SamplingDefaults({}, "the model declares none")
    if model_path.is_dir():
        config = model_path / "generation_config.json"
        declared = _checked(_read_json(config), str(config)) if config.exists() else {}
        return SamplingDefaults(declared, config.name if declared else "the model declares none")
    if model_path.name == DEFAULT_MODEL_FILE:
        return SamplingDefaults(DEFAULT_MODEL_SAMPLING, "the default model's card")
    declared = _checked(_gguf_sampling(model_path), str(model_path))
    return SamplingDefaults(declared, "the GGUF's general.sampling keys" if declared else "the model declares none")
