"""The contract between the model and an attention implementation.

One forward pass computes a *flattened* batch: the new tokens of every scheduled
sequence are concatenated into one token axis of length T. Sequence i owns rows
``query_start_loc[i]:query_start_loc[i + 1]`` of that axis. Its earlier tokens
(a cached prefix, earlier prefill chunks, earlier decode steps) are already in
the paged KV cache; the new tokens' keys and values are written there by the
backend before attention is computed, so attention always reads keys and
values from the cache.

Index ranges of sequence i (block size 4, 6 tokens cached, 3 new)::

    context position   0 1 2 3 | 4 5 6 7 | 8
    block table row    [b0      | b1      | b2 ...]
    already cached     x x x x   x x
    new this step                    q q   q      <- rows query_start_loc[i]..+3
    seq_lens[i] = 9, query_len = 3, causal: new token j sees positions <= 6 + j

KV cache of one layer: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``,
index 0 keys, index 1 values. Slot ``s`` is block ``s // block_size``, offset
``s % block_size``. ``slot_mapping`` of -1 means "do not write" (padding).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class StaticLayout:
    """How a step replayed from a CUDA graph of mixed batches lays its work out.

    A graph fixes every launch's size at capture, so these tensors have fixed
    shapes and the step's own values in them. The model runner puts a batch's
    decodes (one new token each) first; ``D`` and ``G`` are fixed per graph.
    """

    decode_seq_lens: torch.Tensor  # (D,) int32: context length of each leading decode, 0 past them
    prefill_work: torch.Tensor  # (2, G) int32: (sequence, query block) per prefill program, -1 past them
    prefill_block_tokens: int  # new tokens per query block of ``prefill_work``


@dataclass
class AttentionMetadata:
    """Describes one flattened batch. All tensors live on the model's device."""

    query_start_loc: torch.Tensor  # (B + 1,) int32, cumulative new-token counts
    seq_lens: torch.Tensor  # (B,) int32, context length after this step (cached + new)
    block_tables: torch.Tensor  # (B, max_blocks_per_seq) int32, padded with 0
    slot_mapping: torch.Tensor  # (T,) int64, cache slot of each new token (-1: skip)
    max_query_len: int  # max new tokens of one sequence (1 for a pure decode batch)
    max_seq_len: int  # max of seq_lens
    # Host copies, so a backend may loop or size launches without a device sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Set in CUDA graphs of mixed batches (``worker.cuda_graphs.MixedGraphs``), where
    # the host lists above describe the capture's batch, not the replayed one. A
    # backend that runs in such graphs sizes its launches from this alone; the torch
    # backend never runs in one and ignores it.
    static: StaticLayout | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Paged attention for one layer shape.

    Implementations: ``worker.attention.torch_backend`` (reference, CPU and GPU)
    and the Triton one over ``kernels/`` (GPU).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (T, num_heads, head_dim)
        k: torch.Tensor,  # (T, num_kv_heads, head_dim)
        v: torch.Tensor,  # (T, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        """Write k and v into ``kv_cache`` at ``meta.slot_mapping`` (unless ``kv_written``:
        the caller has, with the rotary embedding), then return causal attention of every
        new token over its sequence's cached context."""
