"""The attention layer: rotary embedding, then paged causal attention over one layer's KV
cache through an attention backend (``worker.attention``)."""

from __future__ import annotations

import torch
from torch import nn

from loomserve.worker.attention.base import AttentionBackend, AttentionMetadata
from loomserve.worker.layers.rotary import CacheWrite, Rotary


class Attention(nn.Module):
    """Grouped-query attention of ``num_heads`` query heads over ``num_kv_heads`` key/value
    heads (this rank's).

    Where the rotary layer can (``Rotary.writes_kv_cache``), the launch that rotates the
    keys also writes them and the values into the cache, and the backend is told not to:
    one kernel instead of two.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: type[AttentionBackend],
        rotary: Rotary,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.rotary = rotary
        self.backend = backend(num_heads, num_kv_heads, head_dim, scale)

    def forward(
        self,
        qkv: torch.Tensor,  # (T, H + 2 KV, D): queries, keys, values
        rope: tuple[torch.Tensor, ...],  # this step's Rotary.step_inputs
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KV, D)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H, D)
        h, kv = self.num_heads, self.num_kv_heads
        v = qkv[:, h + kv :]
        fused = self.rotary.writes_kv_cache
        cache = CacheWrite(v, kv_cache, meta.slot_mapping) if fused else None
        # q and k are adjacent heads of qkv: one call rotates both.
        qk = self.rotary(qkv[:, : h + kv], h, rope, cache)  # (T, H + KV, D)
        return self.backend.forward(qk[:, :h], qk[:, h:], v, kv_cache, meta, kv_written=fused)
