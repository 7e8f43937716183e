"""Prefill / extend attention over a paged KV cache, several sequences per launch.

Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b + 1]`` of the
flattened batch; its ``seq_lens[b]`` context tokens, the new ones included, are
already in the cache (see ``worker.attention.base``). New token ``j`` sits at
context position ``prefix_len + j`` (``prefix_len = seq_len - query_len``) and
attends to positions ``<= prefix_len + j``: the whole prefix plus the new tokens
up to itself. Every key and value is read through the sequence's block table.

One program computes a tile of ``BLOCK_M`` rows of one sequence for one KV head:
the (token, query head) pairs of ``BLOCK_M // GROUP_PAD`` consecutive new tokens and
the ``GROUP`` query heads that share the KV head, so each key and value tile is
loaded once for the whole group. ``GROUP_PAD`` is ``GROUP`` rounded up to a power
of two (tile shapes must be powers of two)::

    row r:  token  m_start + r // GROUP_PAD
            head   kv_head * GROUP + r % GROUP_PAD    padding (masked) when r % GROUP_PAD >= GROUP

    GROUP 3, BLOCK_M 16:  rows  0  1  2  3 | 4  5  6  7 | ... | 12 13 14 15
                          token    t0      |    t0+1    | ... |    t0+3
                          head  h0 h1 h2 -- | h0 h1 h2 -- | ... | h0 h1 h2 --

The context streams through in ``BLOCK_N``-token tiles with an online softmax in
fp32 (exp2 domain); each row is masked causally at its own token's position. Tiles
wholly before the tile's first token position need no causal mask, so they run in
a separate loop without it. With ``GROUP == 1`` (multi-head attention) a row is a
token, as in a per-head layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from loomserve.kernels import (
    FLOAT_DTYPES,
    KV_FP8,
    check_devices,
    check_dtype,
    check_kv_cache_dtype,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
    is_interpreted,
    kv_cache_arg,
)


@triton.jit
def _prefill_tile(  # type: ignore[no-untyped-def]
    q,  # (BLOCK_M, BLOCK_D) queries of this program's (token, head) rows
    m_i,  # (BLOCK_M,) running max, exp2 domain
    l_i,  # (BLOCK_M,) running denominator
    acc,  # (BLOCK_M, BLOCK_D) running numerator, fp32
    k_cache_ptr,
    v_cache_ptr,
    block_row_ptr,  # this sequence's block-table row
    n_start,
    kv_head,
    query_pos,  # (BLOCK_M,) context position of each row's token
    seq_len,
    scale_log2e,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    BLOCK_SIZE: tl.constexpr,
    offs_n,
    offs_d,
    mask_d,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache holds FP8 (e4m3) bytes
):
    pos = n_start + offs_n  # (BLOCK_N,) context positions of this tile
    if CAUSAL:
        in_seq = pos < seq_len
        phys = tl.load(block_row_ptr + pos // BLOCK_SIZE, mask=in_seq, other=0)
        kv_mask = in_seq[:, None] & mask_d[None, :]
    else:
        # Callers only run unmasked tiles that lie wholly inside the context.
        phys = tl.load(block_row_ptr + pos // BLOCK_SIZE)
        kv_mask = mask_d[None, :]
    # int64: block index times block stride can pass 2**31 on large caches.
    row_off = (
        phys.to(tl.int64) * stride_cache_block
        + (pos % BLOCK_SIZE) * stride_cache_slot
        + kv_head * stride_cache_head
    )
    kv_off = row_off[:, None] + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    if KV_FP8:
        k = k.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # (M, N)
    if CAUSAL:
        visible = (pos[None, :] <= query_pos[:, None]) & in_seq[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    if KV_FP8:
        v = v.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_prefill_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table,
    work_ptr,
    stride_work,
    head_dim,
    BLOCK_SIZE: tl.constexpr,  # cache block size; constexpr makes // and % cheap
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two: rows per token
    BLOCK_M: tl.constexpr,  # rows of a tile: BLOCK_M // GROUP_PAD tokens
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_WORK: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    # Tokens per tile; a query block (m_block) is a tile of them.
    BLOCK_T: tl.constexpr = BLOCK_M // GROUP_PAD
    if USE_WORK:
        # Program i computes query block work[1, i] of sequence work[0, i]; -1: nothing.
        item = tl.program_id(0)
        seq = tl.load(work_ptr + item)
        if seq < 0:
            return
        m_block = tl.load(work_ptr + stride_work + item)
    else:
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    m_start = m_block * BLOCK_T  # the tile's first token
    # The grid is sized for the longest query; shorter sequences leave programs idle.
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m_start + offs_r // GROUP_PAD  # (BLOCK_M,) token of each row
    head_in_group = offs_r % GROUP_PAD
    head = kv_head * GROUP + head_in_group  # (BLOCK_M,) query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = (offs_m < q_len) & (head_in_group < GROUP)
    mask_d = offs_d < head_dim
    q_rows = (q_start + offs_m).to(tl.int64)
    # Masked rows (past the query, padding heads) hold zeros: every score of theirs is
    # 0, so their softmax stays finite, and their results are never stored.
    q_off = q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if KV_FP8:
        q = q.to(tl.float16)  # the dots run in fp16 over FP8 keys and values (see the decode kernel)
    query_pos = prefix_len + offs_m
    block_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_block_table

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Positions below prefix_len + m_start (the first token's) are visible to every row.
    unmasked_end = (prefix_len + m_start) // BLOCK_N * BLOCK_N
    for n_start in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_row_ptr, n_start, kv_head,
            query_pos, seq_len, scale_log2e, stride_cache_block, stride_cache_slot,
            stride_cache_head, BLOCK_SIZE, offs_n, offs_d, mask_d,
            CAUSAL=False, DOT_PRECISION=DOT_PRECISION, KV_FP8=KV_FP8,
        )
    # The remaining tiles straddle the diagonal (or the end of the context).
    masked_end = tl.minimum(seq_len, prefix_len + m_start + BLOCK_T)
    for n_start in range(unmasked_end, masked_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_row_ptr, n_start, kv_head,
            query_pos, seq_len, scale_log2e, stride_cache_block, stride_cache_slot,
            stride_cache_head, BLOCK_SIZE, offs_n, offs_d, mask_d,
            CAUSAL=True, DOT_PRECISION=DOT_PRECISION, KV_FP8=KV_FP8,
        )

    # Every valid row saw at least key 0, so l_i > 0 there.
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


class LaunchConfig(NamedTuple):
    """Tile sizes and schedule of one launch (``bench.prefill_sweep`` compares them).

    ``block_m`` counts the rows of a tile, (token, query head) pairs: a tile covers
    ``block_m // group_pad(group)`` tokens.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def group_pad(group: int) -> int:
    """Rows per token of a tile when ``group`` query heads share a KV head."""
    return triton.next_power_of_2(group)


def _cover_group(config: LaunchConfig, group: int) -> LaunchConfig:
    """``config`` with at least one token's rows per tile. Only groups wider than the
    tile need it (over 64 query heads per KV head with the GPU defaults, over 16 under
    the interpreter or with an explicit 16-row tile): the tile then grows to one
    token's ``group_pad`` rows rather than split a group over programs, which would
    load each key and value tile more than once per token."""
    return config._replace(block_m=max(config.block_m, group_pad(group)))


def _launch_config(
    head_dim: int, group: int, max_query_len: int, dtype: torch.dtype, interpreted: bool
) -> LaunchConfig:
    """The configuration a launch with this group and longest query uses."""
    if interpreted:
        # The interpreter runs every tile op in numpy: small tiles keep tests fast.
        return _cover_group(LaunchConfig(16, 16, 1, 1), group)
    # Short queries (chunked prefill tails, decode rows of mixed batches) would waste
    # most rows of a full tile, so the tile shrinks to the longest query's rows. A decode
    # row of a group of 4 fills 4 rows of a 16-row tile.
    rows = max(16, triton.next_power_of_2(max_query_len * group_pad(group)))
    # Most numbers below were measured with one query head per program (rows = tokens),
    # and the tile shapes (64 or 128 rows) kept until bench.prefill_sweep re-measures them
    # with a group's heads packed into the rows.
    if head_dim > 128 or dtype == torch.float32:
        # Wider rows or 4-byte elements: smaller tiles stay within shared memory.
        config = LaunchConfig(min(rows, 64), 32, 4, 2)
    elif head_dim > 64 or group > 1:
        # 64-row tiles with 4 warps: 1.11-1.22x faster than 128-row tiles with 8 warps at head
        # dim 128 in bf16 on an H200, on a 1,808-token chunk, one 4,096-token prompt and 8
        # chunks of 512 over 2,048 cached tokens (bench.prefill_sweep, one head per program).
        # Packed, at head dim 64 with groups of 4, they were 1.08-1.10x faster than 128 rows
        # with 8 warps on the same cases (one H200 run of 50 back-to-back launches).
        config = LaunchConfig(min(rows, 64), 64, 4, 2)
    else:
        # One head per program at head dim 64: no configuration won on every case. 4 warps on
        # a 128-row tile need over 200 registers a thread (compiled for sm_90).
        block_m = min(rows, 128)
        config = LaunchConfig(block_m, 64, 8 if block_m == 128 else 4, 2)
    return _cover_group(config, group)


def paged_prefill_attention(
    q: torch.Tensor,  # (T, H, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    query_start_loc: torch.Tensor,  # (B + 1,) int32
    seq_lens: torch.Tensor,  # (B,) int32, cached + new
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # (T, H, D)
    work: torch.Tensor | None = None,  # (2, G) int32
    config: LaunchConfig | None = None,
) -> torch.Tensor:  # (T, H, D)
    """Causal attention of every new token over its sequence's paged context.

    ``max_query_len`` (a host int, no sync) must be at least every sequence's
    query length. Rows of ``out`` outside ``query_start_loc[0]:query_start_loc[-1]``
    are left untouched.

    Without ``work`` the launch covers every (query block, sequence, KV head) of the
    batch. With it, program ``i`` computes query block ``work[1, i]`` of sequence
    ``work[0, i]`` (-1: nothing) for every KV head, blocks of
    :func:`prefill_block_tokens` tokens as :func:`fill_work_list` lays them out: the
    launch's size then depends on ``G`` alone, which a CUDA graph of mixed steps
    needs, and sequences left out of the list (a mixed batch's decodes) are not
    touched.

    ``config`` overrides the tile sizes chosen from ``max_query_len`` (benchmarks
    only: a work list must be built with the tokens per tile a launch uses); a
    ``block_m`` below one token's rows (:func:`group_pad`) is raised to them.
    """
    check_shape("q", q, (None, None, None))
    num_tokens, num_heads, head_dim = q.shape
    check_shape("kv_cache", kv_cache, (2, None, None, None, head_dim))
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    check_shape("seq_lens", seq_lens, (None,))
    num_seqs = seq_lens.shape[0]
    check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    check_shape("block_tables", block_tables, (num_seqs, None))
    check_dtype("q", q, FLOAT_DTYPES)
    check_kv_cache_dtype(kv_cache, q.dtype)
    for name, index in (
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
        ("block_tables", block_tables),
    ):
        check_dtype(name, index, (torch.int32,))
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, (num_tokens, num_heads, head_dim))
    check_same_dtype(q=q, out=out)
    for name, tensor in (("q", q), ("kv_cache", kv_cache), ("out", out)):
        check_last_dim_contiguous(name, tensor)
    if block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous in its last dimension")
    if work is not None:
        check_shape("work", work, (2, None))
        check_dtype("work", work, (torch.int32,))
        check_last_dim_contiguous("work", work)
    check_devices(
        _paged_prefill_kernel,
        q=q,
        kv_cache=kv_cache,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        out=out,
        **({} if work is None else {"work": work}),
    )
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0, got {max_query_len}")
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    if config is None:
        config = _launch_config(head_dim, group, max_query_len, q.dtype, is_interpreted(_paged_prefill_kernel))
    block_m, block_n, num_warps, num_stages = _cover_group(config, group)
    k_cache, v_cache = kv_cache_arg(kv_cache)
    if work is None:
        grid = (triton.cdiv(max_query_len, block_m // group_pad(group)), num_seqs, num_kv_heads)
        # Never read when USE_WORK is off.
        work_arg, stride_work = query_start_loc, 0
    else:
        if work.shape[1] == 0:
            return out
        grid = (work.shape[1], 1, num_kv_heads)
        work_arg, stride_work = work, work.stride(0)
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        work_arg,
        stride_work,
        head_dim,
        BLOCK_SIZE=kv_cache.shape[2],
        GROUP=group,
        GROUP_PAD=group_pad(group),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        # tl.dot needs every tile dimension to be at least 16.
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # fp32 inputs would otherwise go through TF32 on the GPU; 16-bit ones ignore it.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_WORK=work is not None,
        KV_FP8=kv_cache.dtype == KV_FP8,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def default_launch_config(head_dim: int, max_query_len: int, dtype: torch.dtype, *, group: int) -> LaunchConfig:
    """The configuration a launch with ``group`` query heads per KV head and this
    ``max_query_len`` uses unless told otherwise."""
    return _launch_config(head_dim, group, max_query_len, dtype, is_interpreted(_paged_prefill_kernel))


def prefill_block_tokens(head_dim: int, max_query_len: int, dtype: torch.dtype, *, group: int) -> int:
    """Tokens per program of a launch with ``group`` query heads per KV head and this
    ``max_query_len``: the block size a work list for it must be built with."""
    return default_launch_config(head_dim, max_query_len, dtype, group=group).block_m // group_pad(group)


def work_list_size(num_tokens: int, num_seqs: int, block_tokens: int) -> int:
    """Entries enough for any batch of at most ``num_tokens`` new tokens over at most
    ``num_seqs`` sequences: each sequence's last block may be partial."""
    return -(-num_tokens // block_tokens) + min(num_seqs, num_tokens)


def fill_work_list(
    query_start_loc: np.ndarray,  # (B + 1,) int
    first_seq: int,
    block_tokens: int,
    out: np.ndarray,  # (2, G) int32
) -> int:
    """Write the (sequence, query block) pairs of sequences ``first_seq..B-1``, blocks
    of ``block_tokens`` new tokens, into ``out`` (host memory), -1 after them; return
    how many there are."""
    q_lens = np.diff(query_start_loc[first_seq:])
    blocks = -(-q_lens // block_tokens)  # (B - first_seq,)
    count = int(blocks.sum())
    if count > out.shape[1]:
        raise ValueError(f"{count} query blocks do not fit a work list of {out.shape[1]}")
    seqs = np.repeat(np.arange(first_seq, first_seq + len(q_lens)), blocks)
    firsts = np.repeat(np.cumsum(blocks) - blocks, blocks)
    out[0, :count] = seqs
    out[1, :count] = np.arange(count) - firsts
    out[:, count:] = -1
    return count


def gather_context(
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    block_table_row: torch.Tensor,  # (max_blocks,)
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x (seq_len, KVH, D)
    """Keys and values of the first ``seq_len`` context positions of one sequence."""
    block_size = kv_cache.shape[2]
    blocks = block_table_row[: triton.cdiv(seq_len, block_size)].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


def paged_prefill_attention_ref(
    q: torch.Tensor,  # (T, H, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    query_start_loc: torch.Tensor,  # (B + 1,)
    seq_lens: torch.Tensor,  # (B,)
    block_tables: torch.Tensor,  # (B, max_blocks)
    scale: float,
) -> torch.Tensor:  # (T, H, D) float32
    """Torch reference of :func:`paged_prefill_attention`, computed in fp32.

    Rows outside every sequence are zero.
    """
    num_heads = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[seq], starts[seq + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k, v = gather_context(kv_cache, block_tables[seq], seq_len)
        group = num_heads // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1)  # (S, H, D)
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale  # (H, q, S)
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        key_pos = torch.arange(seq_len, device=q.device)
        scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return out
