"""The inputs kernel benchmarks run on: the per-layer shapes of the models served, and a paged
KV cache over randomly scattered blocks with queries to attend over it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK_SIZE = 16


@dataclass(frozen=True)
class LayerShape:
    """The per-layer sizes a kernel sees (tensor parallel degree 1)."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int

    def projections(self) -> tuple[tuple[str, int, int], ...]:
        """(name, out features, in features) of each weight a decode step multiplies."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return (
            ("qkv_proj", q + 2 * kv, self.hidden),
            ("o_proj", self.hidden, q),
            ("gate_up_proj", 2 * self.intermediate, self.hidden),
            ("down_proj", self.hidden, self.intermediate),
            ("lm_head", self.vocab, self.hidden),
        )


LLAMA_3_1_8B = LayerShape("llama-3.1-8b", 32, 8, 128, 4096, 14336, 128256)
LLAMA_3_2_1B = LayerShape("llama-3.2-1b", 32, 8, 64, 2048, 8192, 128256)
SHAPES = (LLAMA_3_1_8B, LLAMA_3_2_1B)


@dataclass
class PagedInputs:
    q: torch.Tensor  # (T, H, D)
    kv_cache: torch.Tensor  # (2, num_blocks, BLOCK_SIZE, KVH, D)
    query_start_loc: torch.Tensor  # (B + 1,) int32
    seq_lens: torch.Tensor  # (B,) int32
    block_tables: torch.Tensor  # (B, max_blocks) int32
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    scale: float


def make_paged_inputs(
    shape: LayerShape,
    query_lens: Sequence[int],
    prefix_lens: Sequence[int],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> PagedInputs:
    """Random queries and cache; each sequence owns randomly scattered blocks."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros((len(seq_lens), max(blocks_per_seq)), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = perm[used : used + n]
        used += n
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    kv_cache = torch.randn(
        (2, num_blocks, block_size, shape.num_kv_heads, shape.head_dim),
        generator=dev_gen,
        dtype=dtype,
        device=device,
    )
    q = torch.randn(
        (sum(query_lens), shape.num_heads, shape.head_dim),
        generator=dev_gen,
        dtype=dtype,
        device=device,
    )
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedInputs(
        q=q,
        kv_cache=kv_cache,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        scale=shape.head_dim**-0.5,
    )
