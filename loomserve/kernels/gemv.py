"""Matrix-vector product for one-row inputs: ``x @ weight.T (+ bias)`` with ``x`` a single row.

At batch 1 a decode step is a chain of such products: every weight is read once
and used for one multiply-add per element, so the step is bound by memory
bandwidth. A matrix-multiply kernel tiles the input rows as well, and at one row
most of that tile is padding. Here each program owns ``BLOCK_N`` output
features: it streams their weight rows in ``BLOCK_K``-wide slices (contiguous in
memory, so loads are full-width, and each one loaded an iteration ahead),
multiplies them by the matching slice of ``x`` and accumulates elementwise in fp32
registers, reducing across ``K`` only once at the end. Launched with programmatic
dependent launch (see ``kernels/__init__.py``), a program loads its first weight
slice while the kernel that produces ``x`` is still running. Many small programs
(about two thousand for a 4096-feature layer) keep enough loads in flight to saturate
the memory bus.

:func:`linear` uses the kernel for one row only: from a few rows on, a matrix-multiply
tile is no longer mostly padding, and cuBLAS's tensor-core kernels win.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from loomserve.kernels import (
    FLOAT_DTYPES,
    check_devices,
    check_dtype,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
    is_interpreted,
    pdl_args,
)

# The widest slice of a weight row a program loads per iteration. A program keeps a
# (BLOCK_N, BLOCK_K) fp32 accumulator in registers: 2 x 2048 is 32 per thread at 4 warps.
MAX_BLOCK_K = 2048


@triton.jit
def _gemv_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no column masks on x
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (see kernels/__init__.py)
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    # The weight slice of the next iteration is loaded one iteration ahead; the first one
    # before waiting for the kernel that produces x (weights are never written).
    w_next = tl.load(w_ptrs, mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_next
        x = tl.load(x_ptr + k0 + cols) if EVEN_K else tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0)
        next_cols = k0 + BLOCK_K + cols
        w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=row_mask[:, None] & (next_cols < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)


class GemvConfig(NamedTuple):
    """A program's tile and warps (``bench.batch1_decode --gemv-configs`` compares them)."""

    block_n: int  # output features per program
    block_k: int  # width of the weight slices it streams
    num_warps: int


def default_gemv_config(out_features: int, in_features: int, interpreted: bool = False) -> GemvConfig:
    """The configuration the launcher uses for a ``(out_features, in_features)`` weight:
    2 output features per program, slices of up to 2,048 inputs, 4 warps.

    Chosen on whole batch-1 decode steps (``bench.batch1_decode --gemv-configs``, one H200):
    at Llama-3.1-8B 4.22 ms a step against 4.46 ms for 4 x 1,024 and 4.25-4.47 ms for the
    other tiles tried; at Llama-3.2-1B, whose steps vary more from run to run, among the
    best. The interpreter gets small tiles.
    """
    if interpreted:
        return GemvConfig(2, min(64, triton.next_power_of_2(in_features)), 1)
    return GemvConfig(2, min(MAX_BLOCK_K, triton.next_power_of_2(in_features)), 4)


def gemv(
    x: torch.Tensor,  # (..., K), one row in all
    weight: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None = None,  # (N,)
    out: torch.Tensor | None = None,  # (..., N)
    config: GemvConfig | None = None,
) -> torch.Tensor:  # (..., N)
    """``F.linear(x, weight, bias)`` for an ``x`` of exactly one row, in fp32 registers,
    rounded once to the input dtype. ``config`` overrides :func:`default_gemv_config`."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_dtype("x", x, FLOAT_DTYPES)
    k = x.shape[-1]
    if x.numel() != k:
        raise ValueError(f"x must hold one row, got shape {tuple(x.shape)}")
    check_shape("weight", weight, (None, k))
    n = weight.shape[0]
    check_same_dtype(x=x, weight=weight)
    if weight.stride(-1) != 1 and k > 1:
        raise ValueError(f"weight must be contiguous in its last dimension (stride {weight.stride(-1)})")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        check_shape("bias", bias, (n,))
        check_same_dtype(x=x, bias=bias)
        check_last_dim_contiguous("bias", bias)
        tensors["bias"] = bias
    out_shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    check_shape("out", out, out_shape)
    check_same_dtype(x=x, out=out)
    check_last_dim_contiguous("out", out)
    device = check_devices(_gemv_kernel, out=out, **tensors)
    x_row = x.reshape(k).contiguous()  # a copy only if the row is strided
    if n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(out_shape)) if bias is not None else out.zero_()
    block_n, block_k, num_warps = config or default_gemv_config(n, k, is_interpreted(_gemv_kernel))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x_row,
        weight,
        bias if bias is not None else weight,
        out.view(n),
        n,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        **pdl_args(_gemv_kernel, device),
    )
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`gemv` in fp32."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """``F.linear``, through :func:`gemv` (with ``config``, if given) when ``x`` is one row
    (a batch-1 decode step, or the LM head over one sequence's last token)."""
    if x.numel() == x.shape[-1] and x.numel() > 0:
        return gemv(x, weight, bias, config=config)
    return F.linear(x, weight, bias)
