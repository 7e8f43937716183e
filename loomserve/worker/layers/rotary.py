"""Rotary position embedding of queries and keys, Hugging Face's "rotate_half" layout:
in torch ops, or one Triton kernel per layer (``kernels.rotary``) that can also write the
rotated keys and the values into the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loomserve.worker.model_config import ModelConfig, llama3_freq_factors


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (head_dim / 2,) in fp32, Llama 3 scaling applied if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_scaling is not None:
        divisors = llama3_freq_factors(config.rope_scaling, d, config.rope_theta)
        inv_freq = inv_freq / torch.tensor(divisors, dtype=torch.float32)
    return inv_freq


def rope_tables(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin tables, each (max_positions, D / 2): computed in fp32 and rounded to
    ``dtype``, as the reference models do."""
    inv_freq = rope_inv_freq(config).to(device)  # (D / 2,)
    positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (P, D / 2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (T, N, D) in the Hugging Face "rotate_half" layout.

    ``cos`` is (T, 1, D) and ``sin`` (T, 1, D) already signed as ``[-sin, sin]``,
    so ``x * cos + [x2, x1] * sin`` equals ``x * cos + rotate_half(x) * sin``.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (T, N, D)
    return torch.addcmul(x * cos, swapped, sin)


@dataclass(frozen=True)
class CacheWrite:
    """Where a rotary layer that can (``Rotary.writes_kv_cache``) puts the rotated keys and
    the values: this layer's cache, at the step's slots."""

    v: torch.Tensor  # (T, KV, D)
    kv_cache: torch.Tensor  # (2, num_blocks, block_size, KV, D)
    slot_mapping: torch.Tensor  # (T,)


class Rotary(nn.Module):
    """Rotary embedding of queries and keys in torch ops.

    Work that depends only on the positions is done once per forward pass by
    ``step_inputs`` (on the model's one instance); every attention layer then
    calls its own instance with the result.
    """

    # Whether ``forward`` also writes the keys and values into the KV cache when given a
    # ``CacheWrite`` (the attention backend is then told not to).
    writes_kv_cache = False

    def step_inputs(
        self,
        cos_table: torch.Tensor,  # (max_positions, D / 2)
        sin_table: torch.Tensor,  # (max_positions, D / 2)
        positions: torch.Tensor,  # (T,) int64
    ) -> tuple[torch.Tensor, ...]:
        """``(cos, signed sin)``, each (T, 1, D): the rotation gathered once per step
        rather than once per layer."""
        cos = cos_table[positions]  # (T, D / 2)
        sin = sin_table[positions]
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)

    def forward(
        self, qk: torch.Tensor, num_q_heads: int, step: tuple[torch.Tensor, ...], cache: CacheWrite | None = None
    ) -> torch.Tensor:
        """``qk`` (T, H + KV, D), the ``num_q_heads`` query heads followed by the key
        heads, rotated (a new tensor here; subclasses may rotate in place)."""
        if cache is not None:
            raise ValueError(f"{type(self).__name__} does not write the KV cache")
        cos, sin = step
        # Queries and keys get the same rotation, so one call covers both.
        return apply_rotary(qk, cos, sin)


class TritonRotary(Rotary):
    """:class:`Rotary` through ``kernels.rotary``: one in-place kernel per layer that
    reads each token's cos/sin row straight from the tables and, given a
    :class:`CacheWrite`, writes the rotated keys and the values into the KV cache in
    the same launch."""

    writes_kv_cache = True

    def __init__(self) -> None:
        super().__init__()
        # triton is optional: see layers.norm.TritonRMSNorm.
        from loomserve.kernels.rotary import apply_rotary as rotate_in_place

        self._rotate_in_place = rotate_in_place

    def step_inputs(
        self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return positions, cos_table, sin_table

    def forward(
        self, qk: torch.Tensor, num_q_heads: int, step: tuple[torch.Tensor, ...], cache: CacheWrite | None = None
    ) -> torch.Tensor:
        positions, cos_table, sin_table = step
        if cache is None:
            self._rotate_in_place(qk[:, :num_q_heads], qk[:, num_q_heads:], positions, cos_table, sin_table)
        else:
            self._rotate_in_place(
                qk[:, :num_q_heads],
                qk[:, num_q_heads:],
                positions,
                cos_table,
                sin_table,
                v=cache.v,
                kv_cache=cache.kv_cache,
                slot_mapping=cache.slot_mapping,
            )
        return qk
