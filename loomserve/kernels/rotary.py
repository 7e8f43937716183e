"""Rotary position embedding, applied in place to queries and keys.

Layout of the Hugging Face Llama models ("rotate_half"): dimension ``i`` of the
first half of a head pairs with dimension ``i + D/2``, and with angle
``position * inv_freq[i]``::

    out[i]       = x[i] * cos - x[i + D/2] * sin
    out[i + D/2] = x[i + D/2] * cos + x[i] * sin

``cos`` and ``sin`` are caches of shape ``(max_position, D/2)`` indexed by each
token's position (see :func:`build_cos_sin_cache`); the model owns frequency
scaling (e.g. Llama 3.1's) by choosing ``inv_freq``.

Given a paged KV cache and slots, the same launch also writes each token's
rotated keys and its values into the cache (what ``kernels.reshape_and_cache``
does on its own), so a decode step spends one kernel per layer on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from loomserve.kernels import (
    FLOAT_DTYPES,
    FP8_MAX,
    INDEX_DTYPES,
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
from loomserve.kernels.reshape_and_cache import _to_e4m3_bytes


@triton.jit
def _rotate_heads(  # type: ignore[no-untyped-def]
    base_ptr,  # first head of this token
    stride_head,
    num_heads,
    half,
    cos,  # (BLOCK_HALF,) fp32
    sin,  # (BLOCK_HALF,) fp32
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate ``num_heads`` heads in place; return both rotated halves as stored
    (rounded to the tensor's dtype), each (BLOCK_H, BLOCK_HALF)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_j < half)[None, :]
    first = base_ptr + offs_h[:, None] * stride_head + offs_j[None, :]  # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    out_ty = base_ptr.dtype.element_ty
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty)
    tl.store(first, out1, mask=mask)
    tl.store(first + half, out2, mask=mask)
    return out1, out2


@triton.jit
def _to_cache(x, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr):  # type: ignore[no-untyped-def]
    """``x`` as the cache stores it: FP8 bytes, or unchanged."""
    # One return statement: the compiler checks every return's type, even one after a constexpr
    # branch that returned (the interpreter does not), and a constexpr ternary compiles one side.
    return _to_e4m3_bytes(x, FP8_MAX) if KV_FP8 else x


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    v_ptr,  # the rest only with WRITE_CACHE
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    stride_vt,
    stride_vh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    block_size,
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    WRITE_CACHE: tl.constexpr,  # also write the rotated keys and the values into the cache
    KV_FP8: tl.constexpr,  # the cache holds FP8 (e4m3) bytes
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (see kernels/__init__.py)
):
    # One program rotates every query and key head of one token, so the token's
    # cos/sin row is loaded once.
    if PDL:
        gdc_wait()  # the positions are a step's input
        gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_HALF)
    mask_j = offs_j < half
    cos = tl.load(cos_ptr + pos * stride_cos + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, num_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_HALF
    )
    k1, k2 = _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, num_k_heads, half, cos, sin, BLOCK_HK, BLOCK_HALF
    )
    if WRITE_CACHE:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # -1: a padding token, nothing to write
            offs_h = tl.arange(0, BLOCK_HK)
            mask = (offs_h < num_k_heads)[:, None] & mask_j[None, :]
            row = (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot
            dst = row + offs_h[:, None] * stride_cache_head + offs_j[None, :]  # (BLOCK_HK, BLOCK_HALF)
            tl.store(k_cache_ptr + dst, _to_cache(k1, KV_FP8, FP8_MAX), mask=mask)
            tl.store(k_cache_ptr + dst + half, _to_cache(k2, KV_FP8, FP8_MAX), mask=mask)
            src = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_j[None, :]
            v1 = tl.load(src, mask=mask, other=0.0)
            v2 = tl.load(src + half, mask=mask, other=0.0)
            tl.store(v_cache_ptr + dst, _to_cache(v1, KV_FP8, FP8_MAX), mask=mask)
            tl.store(v_cache_ptr + dst + half, _to_cache(v2, KV_FP8, FP8_MAX), mask=mask)


def apply_rotary(
    q: torch.Tensor,  # (T, H, D), modified in place
    k: torch.Tensor,  # (T, KVH, D), modified in place
    positions: torch.Tensor,  # (T,) int64 or int32
    cos: torch.Tensor,  # (max_position, D/2)
    sin: torch.Tensor,  # (max_position, D/2)
    v: torch.Tensor | None = None,  # (T, KVH, D)
    kv_cache: torch.Tensor | None = None,  # (2, num_blocks, block_size, KVH, D)
    slot_mapping: torch.Tensor | None = None,  # (T,) int64 (int32 accepted), -1 = skip
) -> None:
    """Rotate ``q`` and ``k`` in place by each token's position; with ``v``,
    ``kv_cache`` and ``slot_mapping``, also write the rotated keys and the values
    into the cache, as ``kernels.reshape_and_cache`` would after the rotation.

    ``q``, ``k`` and ``v`` may be strided views (e.g. slices of a fused qkv output)
    as long as each head's ``D`` elements are contiguous. Positions must be below
    ``max_position``; checking that would need a device sync. Slots must be distinct
    (apart from -1) and inside the cache.
    """
    check_shape("q", q, (None, None, None))
    num_tokens, num_q_heads, head_dim = q.shape
    check_shape("k", k, (num_tokens, None, head_dim))
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim {head_dim} must be even for rotate_half rotary")
    half = head_dim // 2
    check_shape("positions", positions, (num_tokens,))
    check_shape("cos", cos, (None, half))
    check_shape("sin", sin, tuple(cos.shape))
    check_dtype("q", q, FLOAT_DTYPES)
    check_same_dtype(q=q, k=k)
    check_dtype("positions", positions, INDEX_DTYPES)
    check_dtype("cos", cos, FLOAT_DTYPES)
    check_same_dtype(cos=cos, sin=sin)
    for name, tensor in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_last_dim_contiguous(name, tensor)
    device = check_devices(_rotary_kernel, q=q, k=k, positions=positions, cos=cos, sin=sin)
    num_k_heads = k.shape[1]
    write_cache = kv_cache is not None
    if write_cache != (v is not None) or write_cache != (slot_mapping is not None):
        raise ValueError("v, kv_cache and slot_mapping go together: pass all three or none")
    if v is not None and kv_cache is not None and slot_mapping is not None:
        check_shape("v", v, (num_tokens, num_k_heads, head_dim))
        check_same_dtype(k=k, v=v)
        check_shape("kv_cache", kv_cache, (2, None, None, num_k_heads, head_dim))
        check_kv_cache_dtype(kv_cache, k.dtype)
        check_shape("slot_mapping", slot_mapping, (num_tokens,))
        check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
        check_last_dim_contiguous("v", v)
        check_last_dim_contiguous("kv_cache", kv_cache)
        check_devices(_rotary_kernel, q=q, v=v, kv_cache=kv_cache, slot_mapping=slot_mapping)
        k_cache, v_cache = kv_cache_arg(kv_cache)
        v_arg, slots = v, slot_mapping
    else:
        # Never read without WRITE_CACHE; any tensors will do.
        k_cache = v_cache = v_arg = k
        slots = positions
    if num_tokens == 0:
        return
    block_hq = triton.next_power_of_2(num_q_heads)
    block_half = triton.next_power_of_2(half)
    # About 16 elements of the query tile per thread when compiled.
    num_warps = 1 if is_interpreted(_rotary_kernel) else min(8, max(1, block_hq * block_half // 512))
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        v_arg,
        k_cache,
        v_cache,
        slots,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        v_arg.stride(0),
        v_arg.stride(1),
        k_cache.stride(0) if write_cache else 0,
        k_cache.stride(1) if write_cache else 0,
        k_cache.stride(2) if write_cache else 0,
        kv_cache.shape[2] if kv_cache is not None else 1,
        num_q_heads,
        num_k_heads,
        half,
        BLOCK_HQ=block_hq,
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=block_half,
        WRITE_CACHE=write_cache,
        KV_FP8=kv_cache is not None and kv_cache.dtype == KV_FP8,
        FP8_MAX=FP8_MAX,
        num_warps=num_warps,
        **pdl_args(_rotary_kernel, device),
    )


def build_cos_sin_cache(
    inv_freq: torch.Tensor,  # (D/2,)
    max_position: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin: (max_position, D/2) float32
    """cos/sin of ``position * inv_freq`` for every position below ``max_position``."""
    positions = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq.float())  # (max_position, D/2)
    return angles.cos(), angles.sin()


def apply_rotary_ref(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (T, KVH, D)
    positions: torch.Tensor,  # (T,)
    cos: torch.Tensor,  # (max_position, D/2)
    sin: torch.Tensor,  # (max_position, D/2)
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated q, k in float32; inputs untouched
    """Torch reference of :func:`apply_rotary` (out of place, fp32)."""
    cos_t = cos[positions.long()].float().repeat(1, 2)[:, None, :]  # (T, 1, D)
    sin_t = sin[positions.long()].float().repeat(1, 2)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos_t + torch.cat((-x2, x1), dim=-1) * sin_t

    return rotate(q), rotate(k)
