"""Random weights at the real shape of a named model, for benchmarks without checkpoints.

Parameters are allocated and filled on the target device itself (no host copy
of the model). Each checkpoint tensor (by Hugging Face name) is drawn whole
from its own generator, seeded from the seed and the name, and goes through the
same ``WeightFiller`` as real checkpoints: so a rank of a tensor-parallel group
keeps its slice of the very weights a single GPU would hold, and outputs can be
compared across group sizes. Linear and embedding weights are drawn with a
small standard deviation and norms are ones, so activations stay finite in
bf16 through every layer.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import torch

from worker.attention.base import AttentionBackend
from worker.loader.safetensors_loader import read_hf_config
from worker.model_config import ModelConfig
from worker.models.llama import LlamaForCausalLM, WeightFiller, build_model
from worker.parallel import SINGLE, TensorParallel

log = logging.getLogger(__name__)

DUMMY_STD = 0.02

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

# Hugging Face config.json values of the published models (EOS ids of the Instruct variants).
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
}


def dummy_config(model: str | Path) -> ModelConfig:
    """The config of a ``DUMMY_SHAPES`` name, or of a Hugging Face directory's config.json."""
    key = str(model).lower()
    if key in DUMMY_SHAPES:
        return ModelConfig.from_hf_config(DUMMY_SHAPES[key], name=key)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return read_hf_config(path)
    raise ValueError(
        f"no shape for dummy model {str(model)!r}: pass one of {', '.join(DUMMY_SHAPES)} or a "
        f"Hugging Face directory with a config.json"
    )


@torch.no_grad()
def fill_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Fill every parameter: norms 1, biases 0, others N(0, DUMMY_STD), each checkpoint
    tensor from a generator of its own (see the module's docstring)."""
    device = model.embed_tokens.weight.device
    if device.type == "meta":
        return
    filler = WeightFiller(model, f"dummy {model.config.name}")
    dtype = model.embed_tokens.weight.dtype
    for name, target in filler.targets.items():
        full = torch.empty(target.full_shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        elif name.endswith(".bias"):
            full.zero_()
        else:
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full.normal_(0.0, DUMMY_STD, generator=generator)
        filler.fill(name, full)
    filler.check_complete()


def load_dummy(
    model: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    attn_backend: type[AttentionBackend],
    tp: TensorParallel = SINGLE,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = dummy_config(model)
    log.info(
        "dummy weights at the shape of %s (%d layers, hidden %d), seed %d",
        config.name,
        config.num_layers,
        config.hidden_size,
        seed,
    )
    net = build_model(config, attn_backend, dtype=dtype, device=device, tp=tp)
    fill_dummy_weights(net, seed)
    return net, config
