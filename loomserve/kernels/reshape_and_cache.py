"""Write the new tokens' keys and values into their paged KV-cache slots.

Slot ``s`` is offset ``s % block_size`` of block ``s // block_size``; slot -1 marks a
padding token that must not be written.
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
    kv_cache_arg,
    pdl_args,
    to_cache_dtype,
)


@triton.jit
def _to_e4m3_bytes(x, FP8_MAX: tl.constexpr):  # type: ignore[no-untyped-def]
    """The FP8 (e4m3) bytes of ``x``: rounded to nearest (ties to even), saturated at
    +-FP8_MAX, a NaN stored as 0 (``kernels.to_cache_dtype``, the reference). The rounding
    is done on the float32 bits (3 of 23 mantissa bits kept; multiples of 2**-9 below the
    smallest normal, 2**-6) so that the final conversion is exact: the Triton interpreter's
    own cast loses the carry when rounding crosses a power of two (31.0 gives 16.0) and the
    sign of zero."""
    x = x.to(tl.float32)
    x = tl.where(x == x, x, 0.0)
    negative = x.to(tl.int32, bitcast=True) < 0
    mag = tl.minimum(tl.abs(x), FP8_MAX)
    bits = mag.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = (mag + 24576.0) - 24576.0  # 1.5 * 2**14: float32 spacing 2**-9 there
    exact = tl.where(mag < 0.015625, subnormal, normal)
    byte = exact.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(negative, byte | 0x80, byte)


# Elements of one program's tile: enough tokens per program that a long prefill is not
# thousands of tiny programs, one token per program at batch 1.
TILE_ELEMENTS = 4096


@triton.jit
def _reshape_and_cache_kernel(  # type: ignore[no-untyped-def]
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    block_size,
    num_kv_heads,
    head_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr,  # write FP8 (e4m3) bytes, saturated at +-FP8_MAX
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (see kernels/__init__.py)
):
    # One program copies the rows of BLOCK_T tokens, every KV head of each: a
    # (BLOCK_T, BLOCK_H * BLOCK_D) tile whose columns are (head, dim) pairs.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    cols = tl.arange(0, BLOCK_H * BLOCK_D)
    head = cols // BLOCK_D
    dim = cols % BLOCK_D
    mask = (slots >= 0)[:, None] & ((head < num_kv_heads) & (dim < head_dim))[None, :]
    rows = tokens.to(tl.int64)[:, None]
    key = tl.load(key_ptr + rows * stride_kt + (head * stride_kh + dim)[None, :], mask=mask)
    value = tl.load(value_ptr + rows * stride_vt + (head * stride_vh + dim)[None, :], mask=mask)
    if KV_FP8:
        key = _to_e4m3_bytes(key, FP8_MAX)
        value = _to_e4m3_bytes(value, FP8_MAX)
    dst = ((slots // block_size) * stride_cache_block + (slots % block_size) * stride_cache_slot)[:, None] + (
        head * stride_cache_head + dim
    )[None, :]
    tl.store(k_cache_ptr + dst, key, mask=mask)
    tl.store(v_cache_ptr + dst, value, mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # (T, KVH, D)
    value: torch.Tensor,  # (T, KVH, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    slot_mapping: torch.Tensor,  # (T,) int64 (int32 accepted), -1 = skip
) -> None:
    """Write ``key``/``value`` rows into ``kv_cache`` at ``slot_mapping``, in place.

    Slots must be distinct (apart from -1) and below ``num_blocks * block_size``;
    checking either would need a device sync, so the caller guarantees it.
    """
    check_shape("key", key, (None, None, None))
    num_tokens, num_kv_heads, head_dim = key.shape
    check_shape("value", value, (num_tokens, num_kv_heads, head_dim))
    check_shape("kv_cache", kv_cache, (2, None, None, num_kv_heads, head_dim))
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    check_dtype("key", key, FLOAT_DTYPES)
    check_same_dtype(key=key, value=value)
    check_kv_cache_dtype(kv_cache, key.dtype)
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    for name, tensor in (("key", key), ("value", value), ("kv_cache", kv_cache)):
        check_last_dim_contiguous(name, tensor)
    device = check_devices(
        _reshape_and_cache_kernel,
        key=key,
        value=value,
        kv_cache=kv_cache,
        slot_mapping=slot_mapping,
    )
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache_arg(kv_cache)
    block_h, block_d = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    block_t = min(max(TILE_ELEMENTS // (block_h * block_d), 1), triton.next_power_of_2(num_tokens))
    tile = block_t * block_h * block_d
    _reshape_and_cache_kernel[(triton.cdiv(num_tokens, block_t),)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        num_tokens,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        kv_cache.shape[2],
        num_kv_heads,
        head_dim,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        KV_FP8=kv_cache.dtype == KV_FP8,
        FP8_MAX=FP8_MAX,
        num_warps=min(max(tile // 256, 1), 4),
        **pdl_args(_reshape_and_cache_kernel, device),
    )


def reshape_and_cache_ref(
    key: torch.Tensor,  # (T, KVH, D)
    value: torch.Tensor,  # (T, KVH, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    slot_mapping: torch.Tensor,  # (T,)
) -> None:
    """Torch reference of :func:`reshape_and_cache` (in place; syncs on the mask)."""
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0  # (T,)
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    store = kv_cache_arg(kv_cache)
    store[0, blocks, offsets] = to_cache_dtype(key[keep], kv_cache.dtype)
    store[1, blocks, offsets] = to_cache_dtype(value[keep], kv_cache.dtype)

