"""Paged attention on the GPU through the Triton kernels in ``kernels/``.

Each forward writes the new keys and values into the cache (unless the caller
already has: the model's Triton rotary kernel does, and passes ``kv_written``),
then runs one of two kernels over the whole batch:

* a pure-decode batch (every sequence has exactly one new token) goes to the
  flash-decoding kernel, which splits long contexts across programs so a small
  batch still fills the GPU;
* a mixed batch whose leading sequences are decodes (the model runner lays
  batches out that way) sends those to the decode kernel and the rest to the
  prefill kernel. In the prefill kernel a decode row would occupy one row of a
  query tile sized for the longest prompt chunk (up to 128 rows), so its whole
  context would be multiplied by mostly masked rows;
* any other batch goes to the prefill kernel alone, which handles any query
  length per sequence (a decode row is a query of length 1).

Only host-side sizes (``*_cpu`` lists, ``max_query_len``) choose and size the
launches, so a forward never waits for the device. In a CUDA graph of mixed
batches the metadata carries a ``StaticLayout`` instead: the decode kernel runs
over a fixed number of leading rows and the prefill kernel over a fixed-size
work list, both filled in by the host each step. The decode kernel's split
count comes from ``max_seq_len`` alone, which CUDA graphs of decode steps rely
on (see ``worker.cuda_graphs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loomserve.kernels.paged_decode_attention import paged_decode_attention
from loomserve.kernels.paged_prefill_attention import paged_prefill_attention, prefill_block_tokens
from loomserve.kernels.reshape_and_cache import reshape_and_cache
from loomserve.worker.attention.base import AttentionBackend, AttentionMetadata, StaticLayout


def num_leading_decodes(query_start_loc: list[int]) -> int:
    """How many sequences, from the first, have exactly one new token, starting at row 0."""
    if not query_start_loc or query_start_loc[0] != 0:
        return 0
    n = 0
    while n + 1 < len(query_start_loc) and query_start_loc[n + 1] == n + 1:
        n += 1
    return n


@dataclass
class _MixedSplit:
    """A mixed batch cut after its leading decodes, built once per batch."""

    meta: AttentionMetadata
    num_decodes: int
    # The other sequences' metadata. Copies rather than views when cut: Triton
    # specialises kernels on the 16-byte alignment of pointers, and a view at an
    # arbitrary offset would build new kernel variants while serving.
    query_start_loc: torch.Tensor  # (B - num_decodes + 1,) int32
    seq_lens: torch.Tensor  # (B - num_decodes,) int32
    block_tables: torch.Tensor  # (B - num_decodes, max_blocks) int32


class TritonAttentionBackend(AttentionBackend):
    """:class:`AttentionBackend` over the Triton paged-attention kernels."""

    # Shared by all layers' instances: the split of the batch being run, rebuilt
    # when another AttentionMetadata object comes in.
    _split_cache: _MixedSplit | None = None

    @staticmethod
    def _split(meta: AttentionMetadata) -> _MixedSplit:
        cached = TritonAttentionBackend._split_cache
        if cached is not None and cached.meta is meta:
            return cached
        n = num_leading_decodes(meta.query_start_loc_cpu)
        if n == 0:
            split = _MixedSplit(meta, 0, meta.query_start_loc, meta.seq_lens, meta.block_tables)
        else:
            split = _MixedSplit(
                meta,
                n,
                meta.query_start_loc[n:].clone(),
                meta.seq_lens[n:].clone(),
                meta.block_tables[n:].clone(),
            )
        TritonAttentionBackend._split_cache = split
        return split

    def forward(
        self,
        q: torch.Tensor,  # (T, num_heads, head_dim)
        k: torch.Tensor,  # (T, num_kv_heads, head_dim)
        v: torch.Tensor,  # (T, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        num_tokens = q.shape[0]
        expected = (num_tokens, self.num_heads, self.head_dim)
        if tuple(q.shape) != expected:
            raise ValueError(f"q has shape {tuple(q.shape)}, expected {expected}")
        if tuple(k.shape[1:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"k has shape {tuple(k.shape)}, expected (T, {self.num_kv_heads}, {self.head_dim})"
            )
        if not kv_written:
            reshape_and_cache(k, v, kv_cache, meta.slot_mapping)
        if meta.static is not None:
            return self._forward_static(q, kv_cache, meta, meta.static)

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
            split = self._split(meta)
            n = split.num_decodes
            if n:
                paged_decode_attention(
                    q[:n],
                    kv_cache,
                    meta.block_tables[:n],
                    meta.seq_lens[:n],
                    self.scale,
                    meta.max_seq_len,
                    out=out[:n],
                )
            # Rows are addressed through query_start_loc, so the other sequences need
            # no renumbering, and the prefill kernel leaves the decode rows alone.
            paged_prefill_attention(
                q,
                kv_cache,
                split.query_start_loc,
                split.seq_lens,
                split.block_tables,
                self.scale,
                meta.max_query_len,
                out=out,
            )
        if num_real < num_tokens:
            # Padding rows belong to no sequence; zeros keep garbage out of later layers.
            out[num_real:].zero_()
        return out

    def _forward_static(
        self,
        q: torch.Tensor,  # (T, num_heads, head_dim)
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        layout: StaticLayout,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        """A mixed batch in launches whose sizes depend on the layout's shapes only.

        The decode kernel covers the first ``D`` rows; rows past the step's decodes
        have context length 0 there and get zeros, which the prefill kernel then
        overwrites for its own rows (the launches are ordered on one stream). Rows
        of no sequence (padding) stay zero.
        """
        block_tokens = prefill_block_tokens(
            self.head_dim, meta.max_query_len, q.dtype, group=self.num_heads // self.num_kv_heads
        )
        if block_tokens != layout.prefill_block_tokens:
            raise ValueError(
                f"the work list has blocks of {layout.prefill_block_tokens} tokens, but a launch with "
                f"max_query_len {meta.max_query_len} uses {block_tokens}"
            )
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        d = layout.decode_seq_lens.shape[0]
        if d:
            paged_decode_attention(
                q[:d],
                kv_cache,
                meta.block_tables[:d],
                layout.decode_seq_lens,
                self.scale,
                meta.max_seq_len,
                out=out[:d],
            )
        paged_prefill_attention(
            q,
            kv_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            self.scale,
            meta.max_query_len,
            out=out,
            work=layout.prefill_work,
        )
        return out
