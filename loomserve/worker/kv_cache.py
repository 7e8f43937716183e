"""The paged KV cache's memory: what one block costs, and one cache tensor per layer.

A layer's cache is ``(2, num_blocks, block_size, num_kv_heads, head_dim)``, keys at
index 0 and values at 1 (``worker.attention.base`` describes the slots).
"""

from __future__ import annotations

import torch

from loomserve.worker.model_config import ModelConfig


def kv_cache_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None
) -> int:
    """Bytes one KV block takes over all layers (keys and values) of ``num_kv_heads``
    heads (default: all of the model's; a tensor-parallel rank holds its own share)."""
    heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    per_layer = 2 * block_size * heads * config.head_dim * dtype.itemsize
    return per_layer * config.num_layers


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
    num_kv_heads: int | None = None,
) -> list[torch.Tensor]:
    """One zeroed (2, num_blocks, block_size, KV, D) cache per layer, KV being
    ``num_kv_heads`` (default: the model's).

    Zeroed rather than empty: attention multiplies masked-out slots by a zero
    weight, and a NaN left in fresh memory would still poison the result.
    """
    heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    shape = (2, num_blocks, block_size, heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
