"""The served model as the gateway sees it: its name, tokenizer and sampling defaults."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from loomserve.gateway.sampling_defaults import SamplingDefaults


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    revision: str  # changes when the weights change; part of the response-cache key
    sampling_defaults: SamplingDefaults  # for the sampling fields a request leaves out
