"""Decode attention over a paged KV cache: one query token per sequence.

Flash-decoding in two kernels. The split kernel runs one program per
(sequence, kv head, split): it takes all query heads that share the kv head (GQA),
so each key/value tile is read once for the whole group, and attends to one chunk
of the context, producing a normalised partial output and its log-sum-exp. The
combine kernel merges a sequence's partials, weighting each by ``exp(lse - max)``.
With a single split the split kernel writes the final output directly and the
combine kernel is skipped.

Chunks are ``split_len = ceil(ceil(seq_len / num_splits) / BLOCK_N) * BLOCK_N``
tokens, computed per sequence in both kernels, so a short sequence in a batch
sized for a long one simply uses fewer splits (the others are empty).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

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
    pdl_args,
)

# A split shorter than this spends more on its partial result than it saves.
MIN_SPLIT_TOKENS = 256
# Bounds the combine kernel's (splits x head_dim) tile.
MAX_SPLITS = 64
# Programs per SM the split count aims for: the kernel is bound by memory bandwidth,
# so each SM should have several 4-warp programs in flight at once.
PROGRAMS_PER_SM = 4


@triton.jit
def _decode_split_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2e,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    head_dim,
    num_splits,
    BLOCK_SIZE: tl.constexpr,  # cache block size; constexpr makes // and % cheap
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_H: tl.constexpr,  # GROUP padded to a tl.dot-friendly size
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache holds FP8 (e4m3) bytes
    PDL: tl.constexpr,  # launched with programmatic dependent launch (see kernels/__init__.py)
):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = ((seq_len + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < head_dim
    heads = kv_head * GROUP + offs_h  # (BLOCK_H,) query heads of this kv head
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BLOCK_H, BLOCK_D)
    if KV_FP8:
        # FP8 keys and values widen to fp16 more cheaply than to bf16 (widening to bf16 was
        # 10% slower end to end on an H200); the dots then run in fp16, accumulating in fp32.
        q = q.to(tl.float16)
    block_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_block_table

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n_start in range(start, end, BLOCK_N):
        pos = n_start + offs_n  # (BLOCK_N,)
        in_split = pos < end
        phys = tl.load(block_row_ptr + pos // BLOCK_SIZE, mask=in_split, other=0)
        # int64: block index times block stride can pass 2**31 on large caches.
        row_off = (
            phys.to(tl.int64) * stride_cache_block
            + (pos % BLOCK_SIZE) * stride_cache_slot
            + kv_head * stride_cache_head
        )
        kv_off = row_off[:, None] + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
        kv_mask = in_split[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # (H, N)
        qk = tl.where(in_split[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if KV_FP8:
            v = v.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (short sequence, or seq_len 0) has l_i == 0: write zeros, not NaN.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    store_mask = mask_h[:, None] & mask_d[None, :]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )
    else:
        part_base = seq.to(tl.int64) * stride_pb + split * stride_ps
        tl.store(
            part_out_ptr + part_base + heads[:, None] * stride_ph + offs_d[None, :],
            out,
            mask=store_mask,
        )
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # log2 domain
        tl.store(
            part_lse_ptr + seq.to(tl.int64) * stride_lb + heads * stride_lh + split,
            lse,
            mask=mask_h,
        )


@triton.jit
def _decode_combine_kernel(  # type: ignore[no-untyped-def]
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    head_dim,
    num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the split kernel's, to recompute its split length
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = ((seq_len + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    # Splits past the end of this sequence's context wrote nothing useful.
    used = (seq_len + split_len - 1) // tl.maximum(split_len, 1)

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < used
    lse = tl.load(
        part_lse_ptr + seq.to(tl.int64) * stride_lb + head * stride_lh + offs_s,
        mask=mask_s,
        other=float("-inf"),
    )  # (BLOCK_S,)
    # Clamped so that a sequence without keys gives zero weights instead of NaN.
    lse_max = tl.maximum(tl.max(lse, axis=0), -1.0e30)
    weight = tl.exp2(lse - lse_max)  # (BLOCK_S,)
    part = tl.load(
        part_out_ptr
        + seq.to(tl.int64) * stride_pb
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :],
        mask=mask_s[:, None] & (offs_d < head_dim)[None, :],
        other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < head_dim,
    )


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return os.cpu_count() or 1


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Context splits per sequence: enough programs to fill the GPU when the batch alone
    does not, but no split shorter than ``MIN_SPLIT_TOKENS``."""
    programs = max(1, num_seqs * num_kv_heads)
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, programs)
    longest_useful = triton.cdiv(max(max_seq_len, 1), MIN_SPLIT_TOKENS)
    return max(1, min(wanted, longest_useful, MAX_SPLITS))


class DecodeConfig(NamedTuple):
    """Tile size and schedule of the split kernel (``bench.decode_sweep`` compares them)."""

    block_n: int
    num_warps: int
    num_stages: int


def default_decode_config(head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype,
                          interpreted: bool = False) -> DecodeConfig:
    """The configuration the launcher uses for queries of ``dtype`` over a ``cache_dtype`` cache."""
    if interpreted:
        # The interpreter runs every tile op in numpy: small tiles keep tests fast.
        return DecodeConfig(16, 1, 1)
    if head_dim > 128 or dtype == torch.float32:
        # Wider rows or 4-byte elements: smaller tiles stay within shared memory.
        return DecodeConfig(32, 4, 2)
    if cache_dtype == KV_FP8:
        # Widening FP8 in registers keeps the kernel well short of the copy bandwidth (about
        # 55% of it on an H200, against 93-100% for bf16), so a tile of 128 keys, which halves
        # the loop's iterations, pays: 1.13-1.27x faster than 64 keys on batches of 64-256 sequences of 800-4096
        # tokens (bench.decode_sweep). A third stage helps at head dim 128 only.
        return DecodeConfig(128, 4, 3 if head_dim > 64 else 2)
    return DecodeConfig(64, 4, 2)


def paged_decode_attention(
    q: torch.Tensor,  # (B, H, D), one new token per sequence
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    seq_lens: torch.Tensor,  # (B,) int32, context length including the new token
    scale: float,
    max_seq_len: int,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # (B, H, D)
    config: DecodeConfig | None = None,
) -> torch.Tensor:  # (B, H, D)
    """Attention of each sequence's single query over its whole paged context.

    ``max_seq_len`` (a host int, no sync) only picks the split count; ``num_splits``
    overrides that choice (:func:`choose_num_splits`). Results do not depend on
    either, since each sequence derives its split length from its own ``seq_len``:
    a launch recorded in a CUDA graph stays correct as lengths change. A sequence
    with ``seq_len`` 0 gets zeros. ``config`` overrides :func:`default_decode_config`.
    """
    check_shape("q", q, (None, None, None))
    num_seqs, num_heads, head_dim = q.shape
    check_shape("kv_cache", kv_cache, (2, None, None, None, head_dim))
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    check_shape("block_tables", block_tables, (num_seqs, None))
    check_shape("seq_lens", seq_lens, (num_seqs,))
    check_dtype("q", q, FLOAT_DTYPES)
    check_kv_cache_dtype(kv_cache, q.dtype)
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_dtype("seq_lens", seq_lens, (torch.int32,))
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, (num_seqs, num_heads, head_dim))
    check_same_dtype(q=q, out=out)
    for name, tensor in (("q", q), ("kv_cache", kv_cache), ("out", out)):
        check_last_dim_contiguous(name, tensor)
    if block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous in its last dimension")
    device = check_devices(
        _decode_split_kernel,
        q=q,
        kv_cache=kv_cache,
        block_tables=block_tables,
        seq_lens=seq_lens,
        out=out,
    )
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, _num_sms(device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if num_seqs == 0:
        return out

    interpreted = is_interpreted(_decode_split_kernel)
    block_n, num_warps, num_stages = config or default_decode_config(
        head_dim, q.dtype, kv_cache.dtype, interpreted)
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    single = num_splits == 1
    if single:
        # Never read: the split kernel writes straight into ``out``.
        part_out = out.new_empty((1, 1, 1, 1), dtype=torch.float32)
        part_lse = out.new_empty((1, 1, 1), dtype=torch.float32)
    else:
        part_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=device
        )
        part_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=device
        )
    k_cache, v_cache = kv_cache_arg(kv_cache)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        out,
        part_out,
        part_lse,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        head_dim,
        num_splits,
        BLOCK_SIZE=kv_cache.shape[2],
        GROUP=group,
        # tl.dot needs at least 16 rows; padding heads are masked out.
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        SINGLE_SPLIT=single,
        # fp32 inputs would otherwise go through TF32 on the GPU; 16-bit ones ignore it.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=kv_cache.dtype == KV_FP8,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_args(_decode_split_kernel, device),
    )
    if not single:
        _decode_combine_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            seq_lens,
            out,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            out.stride(0),
            out.stride(1),
            head_dim,
            num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=1 if interpreted else 4,
            **pdl_args(_decode_combine_kernel, device),
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,  # (B, H, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    block_tables: torch.Tensor,  # (B, max_blocks)
    seq_lens: torch.Tensor,  # (B,)
    scale: float,
) -> torch.Tensor:  # (B, H, D) float32
    """Torch reference of :func:`paged_decode_attention`, computed in fp32."""
    block_size = kv_cache.shape[2]
    num_heads = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for seq, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        blocks = block_tables[seq, : triton.cdiv(seq_len, block_size)].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:seq_len].float()  # (S, KVH, D)
        v = kv_cache[1, blocks].flatten(0, 1)[:seq_len].float()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # (S, H, D)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,shd->hs", q[seq].float(), k) * scale  # (H, S)
        out[seq] = torch.einsum("hs,shd->hd", scores.softmax(dim=-1), v)
    return out
