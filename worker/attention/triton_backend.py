"""Paged attention on the GPU through the Triton kernels in ``kernels/``.

Each forward writes the new keys and values into the cache, then runs one of two
kernels over the whole batch:

* a pure-decode batch (every sequence has exactly one new token) goes to the
  flash-decoding kernel, which splits long contexts across programs so a small
  batch still fills the GPU;
* any other batch, mixed prefill + decode included, goes to the prefill kernel,
  which handles any query length per sequence (a decode row is a query of
  length 1). Splitting a mixed batch into two launches would need the decode
  rows to be contiguous and their metadata sliced on the host for every layer,
  for little gain: decode rows are a small part of a mixed batch's work.

Only host-side sizes (``*_cpu`` lists, ``max_query_len``) choose and size the
launches, so a forward never waits for the device.
"""

from __future__ import annotations

import torch

from kernels.paged_decode_attention import paged_decode_attention
from kernels.paged_prefill_attention import paged_prefill_attention
from kernels.reshape_and_cache import reshape_and_cache
from worker.attention.base import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    """:class:`AttentionBackend` over the Triton paged-attention kernels."""

    def forward(
        self,
        q: torch.Tensor,  # (T, num_heads, head_dim)
        k: torch.Tensor,  # (T, num_kv_heads, head_dim)
        v: torch.Tensor,  # (T, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        num_tokens = q.shape[0]
        expected = (num_tokens, self.num_heads, self.head_dim)
        if tuple(q.shape) != expected:
            raise ValueError(f"q has shape {tuple(q.shape)}, expected {expected}")
        if tuple(k.shape[1:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"k has shape {tuple(k.shape)}, expected (T, {self.num_kv_heads}, {self.head_dim})"
            )
        reshape_and_cache(k, v, kv_cache, meta.slot_mapping)

        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        num_seqs = meta.num_seqs
        num_real = meta.query_start_loc_cpu[-1] if num_seqs > 0 else 0
        # max_query_len == 1 alone allows sequences with no new token; when the token
        # count equals the sequence count, row i is exactly sequence i's query.
        if meta.is_decode_only and num_real == num_seqs and meta.query_start_loc_cpu[0] == 0:
            paged_decode_attention(
                q[:num_seqs],
                kv_cache,
                meta.block_tables,
                meta.seq_lens,
                self.scale,
                meta.max_seq_len,
                out=out[:num_seqs],
            )
        else:
            paged_prefill_attention(
                q,
                kv_cache,
                meta.query_start_loc,
                meta.seq_lens,
                meta.block_tables,
                self.scale,
                meta.max_query_len,
                out=out,
            )
        if num_real < num_tokens:
            # Padding rows belong to no sequence; zeros keep garbage out of later layers.
            out[num_real:].zero_()
        return out
