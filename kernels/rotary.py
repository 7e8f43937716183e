"""Rotary position embedding, applied in place to queries and keys.

Layout of the Hugging Face Llama models ("rotate_half"): dimension ``i`` of the
first half of a head pairs with dimension ``i + D/2``, and with angle
``position * inv_freq[i]``::

    out[i]       = x[i] * cos - x[i + D/2] * sin
    out[i + D/2] = x[i + D/2] * cos + x[i] * sin

``cos`` and ``sin`` are caches of shape ``(max_position, D/2)`` indexed by each
token's position (see :func:`build_cos_sin_cache`); the model owns frequency
scaling (e.g. Llama 3.1's) by choosing ``inv_freq``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_devices,
    check_dtype,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
    is_interpreted,
    pdl_args,
)


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
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_j < half)[None, :]
    first = base_ptr + offs_h[:, None] * stride_head + offs_j[None, :]  # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    out_ty = base_ptr.dtype.element_ty
    tl.store(first, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty), mask=mask)
    tl.store(first + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
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
    _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, num_k_heads, half, cos, sin, BLOCK_HK, BLOCK_HALF
    )


def apply_rotary(
    q: torch.Tensor,  # (T, H, D), modified in place
    k: torch.Tensor,  # (T, KVH, D), modified in place
    positions: torch.Tensor,  # (T,) int64 or int32
    cos: torch.Tensor,  # (max_position, D/2)
    sin: torch.Tensor,  # (max_position, D/2)
) -> None:
    """Rotate ``q`` and ``k`` in place by each token's position.

    ``q`` and ``k`` may be strided views (e.g. slices of a fused qkv output) as
    long as each head's ``D`` elements are contiguous. Positions must be below
    ``max_position``; checking that would need a device sync.
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
    if num_tokens == 0:
        return
    num_k_heads = k.shape[1]
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
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        num_q_heads,
        num_k_heads,
        half,
        BLOCK_HQ=block_hq,
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=block_half,
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
