"""The shape of a decoder-only model, read from a Hugging Face config or GGUF metadata.

One dataclass covers every architecture ``worker.models.llama`` runs (Llama 2/3.x,
Qwen2/2.5, Mistral, SmolLM2): they differ only in sizes, rope settings and
whether the attention projections carry a bias.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Meta's Llama 3.1/3.2 rope scaling constants; GGUF files store only the resulting
# per-frequency factors, so these are the candidates we match those factors against.
_LLAMA3_LOW_FREQ_FACTOR = 1.0
_LLAMA3_HIGH_FREQ_FACTOR = 4.0
_LLAMA3_ORIGINAL_CONTEXT = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on the q, k and v projections (Qwen2)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Llama checkpoints with ``attention_bias`` also put a bias on o_proj; Qwen2 does not.
    attention_out_bias: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(
        cls,
        hf: Mapping[str, Any],
        *,
        name: str | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout).

        ``generation_config`` (``generation_config.json``) may list more EOS ids than
        ``config.json`` does (Llama 3 Instruct); they are merged.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is supported")
        if hf.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported (no supported model uses it)")
        num_heads = int(hf["num_attention_heads"])
        hidden_size = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden_size // num_heads
        max_pos = int(hf.get("max_position_embeddings", 4096))
        max_pos = _limit_to_sliding_window(hf, model_type, max_pos)
        rope_theta, rope_scaling = _hf_rope(hf)

        if model_type == "qwen2":
            # Qwen2 always has q/k/v biases, whatever the config says.
            qkv_bias, out_bias = True, False
        elif model_type == "mistral":
            qkv_bias = out_bias = False
        else:
            qkv_bias = out_bias = bool(hf.get("attention_bias", False))

        eos = _as_ids(hf.get("eos_token_id"))
        if generation_config is not None:
            eos += tuple(i for i in _as_ids(generation_config.get("eos_token_id")) if i not in eos)
        bos = hf.get("bos_token_id")
        return cls(
            name=name or str(hf.get("_name_or_path") or model_type),
            architecture=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos,
            attention_out_bias=out_bias,
        )

    @classmethod
    def from_gguf_metadata(
        cls,
        metadata: Mapping[str, Any],
        *,
        has_output_weight: bool,
        rope_freq_factors: Sequence[float] | None = None,
        vocab_size: int | None = None,
        qkv_bias: bool | None = None,
        out_bias: bool = False,
    ) -> ModelConfig:
        """Build from GGUF key/value metadata (plain Python values).

        ``has_output_weight``: whether the file has ``output.weight`` (else the
        embeddings are tied). ``rope_freq_factors``: the ``rope_freqs.weight``
        tensor, which is how llama.cpp stores Llama 3 rope scaling. ``vocab_size``:
        the embedding rows, for files without ``<arch>.vocab_size``. ``qkv_bias`` and
        ``out_bias``: whether the file has attn_q/attn_output biases (None: as the
        architecture has them).
        """
        arch = metadata.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}; supported: llama (Llama, Mistral, SmolLM2), qwen2"
            )

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        if int(get("expert_count", 0)) > 0:
            raise ValueError("mixture-of-experts GGUF models are not supported")
        num_heads = get("attention.head_count")
        num_kv_heads = get("attention.head_count_kv", num_heads)
        if isinstance(num_heads, list) or isinstance(num_kv_heads, list):
            raise ValueError("GGUF models with per-layer head counts are not supported")
        hidden_size = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden_size // int(num_heads)))
        rope_dim = int(get("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ValueError(f"partial rotary embeddings (rope dim {rope_dim} of {head_dim}) are not supported")
        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise ValueError(
                f"unsupported GGUF rope scaling {scaling_type!r}; supported: none, and Llama 3 "
                f"scaling stored as rope_freqs"
            )
        rope_theta = float(get("rope.freq_base", 10000.0))
        max_pos = int(get("context_length", 4096))
        rope_scaling = None
        if rope_freq_factors is not None:
            rope_scaling = _llama3_scaling_from_factors(rope_freq_factors, head_dim, rope_theta)

        vocab = metadata.get(f"{arch}.vocab_size", vocab_size)
        if vocab is None:
            raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and no vocab size was given")
        eos: tuple[int, ...] = ()
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            token = metadata.get(key)
            if token is not None and int(token) not in eos:
                eos += (int(token),)
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        return cls(
            name=str(metadata.get("general.name") or arch),
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden_size,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=int(num_heads),
            num_kv_heads=int(num_kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2" if qkv_bias is None else qkv_bias,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos,
            attention_out_bias=out_bias,
        )


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _limit_to_sliding_window(hf: Mapping[str, Any], model_type: str, max_pos: int) -> int:
    """Cap the context at the sliding window, where attention is then exactly full attention."""
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", True) if model_type == "qwen2" else True
    if window is None or not uses_window or int(window) >= max_pos:
        return max_pos
    log.warning(
        "model uses sliding-window attention (window %d); limiting the context to %d tokens, "
        "where it equals full attention",
        window,
        window,
    )
    return int(window)


def _hf_rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes ``rope_parameters`` (theta included); 4.x wrote
    # ``rope_theta`` and ``rope_scaling`` side by side.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling = {
        "rope_type": "llama3",
        "factor": float(params["factor"]),
        "low_freq_factor": float(params["low_freq_factor"]),
        "high_freq_factor": float(params["high_freq_factor"]),
        "original_max_position_embeddings": int(params["original_max_position_embeddings"]),
    }
    return theta, scaling


def llama3_freq_factors(scaling: Mapping[str, Any], head_dim: int, theta: float) -> list[float]:
    """The divisor of each rotary frequency under Llama 3 scaling (1 = unchanged).

    High frequencies (wavelength below ``original / high_freq_factor``) are kept,
    low ones (wavelength above ``original / low_freq_factor``) are divided by
    ``factor``, and the band between blends the two linearly in
    ``original / wavelength``.
    """
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return divisors


def _llama3_scaling_from_factors(factors: Sequence[float], head_dim: int, theta: float) -> dict[str, Any]:
    if len(factors) != head_dim // 2:
        raise ValueError(f"rope_freqs has {len(factors)} entries, expected {head_dim // 2}")
    scaling = {
        "rope_type": "llama3",
        "factor": float(max(factors)),
        "low_freq_factor": _LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": _LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
    }
    expected = llama3_freq_factors(scaling, head_dim, theta)
    if any(not math.isclose(a, b, rel_tol=1e-3) for a, b in zip(factors, expected, strict=True)):
        raise ValueError(
            "rope_freqs in the GGUF file do not match Llama 3 rope scaling (factor "
            f"{scaling['factor']}, low 1, high 4, original context 8192); only that scaling is supported"
        )
    return scaling
