"""The shapes of the ``dummy`` load format: Hugging Face ``config.json`` values of real models.

Plain data, importable without torch: the worker builds random weights at these shapes
(``worker.loader.dummy``) and the gateway builds a synthetic tokenizer of the same
vocabulary and special ids (``gateway.synthetic_tokenizer``), since a dummy model has no
tokenizer of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
}

# Hugging Face config.json values of the published models (EOS ids of the Instruct variants),
# and one made-up shape for tests.
DUMMY_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        **_LLAMA3_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_parameters": {**_LLAMA3_ROPE, "factor": 32.0},
        "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_parameters": {**_LLAMA3_ROPE, "factor": 8.0},
        "tie_word_embeddings": False,
    },
    "llama-3.1-70b": {
        **_LLAMA3_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_parameters": {**_LLAMA3_ROPE, "factor": 8.0},
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "use_sliding_window": False,
        "sliding_window": 32768,
    },
    # Not a published model: a 2-layer Llama 3 in miniature (256 special ids above 32000 regular
    # ones, several EOS ids, so the benchmarks' random ids below 32000 fit) that runs the whole
    # stack on a CPU in milliseconds a step, for end-to-end tests and the benchmarks' smoke runs.
    "llama-tiny": {
        "model_type": "llama",
        "vocab_size": 32256,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 32000,
        "eos_token_id": [32001, 32008, 32009],
        "hidden_act": "silu",
    },
}


def dummy_shape(model: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` values of a ``DUMMY_SHAPES`` name, or of a directory that has one;
    None for anything else."""
    key = str(model).lower()
    if key in DUMMY_SHAPES:
        return DUMMY_SHAPES[key]
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        loaded = json.loads(config.read_text())
        return loaded if isinstance(loaded, dict) else None
    return None
