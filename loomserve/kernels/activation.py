"""SiLU-and-multiply of a fused gate/up projection: ``silu(gate) * up``.

The input holds the gate projection in its first half and the up projection in
its second half along the last dimension, as produced by one fused matmul.
"""

from __future__ import annotations

import torch
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


@triton.jit
def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    inter,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (see kernels/__init__.py)
):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # (..., 2I): [gate | up]
    out: torch.Tensor | None = None,  # (..., I)
) -> torch.Tensor:  # (..., I)
    """``silu(x[..., :I]) * x[..., I:]``, computed in fp32 and rounded once."""
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must have an even last dimension, got shape {tuple(x.shape)}")
    check_dtype("x", x, FLOAT_DTYPES)
    inter = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    check_shape("out", out, out_shape)
    check_same_dtype(x=x, out=out)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    device = check_devices(_silu_and_mul_kernel, x=x, out=out)
    x_rows = x.reshape(-1, 2 * inter)  # (N, 2I)
    out_rows = out.view(-1, inter)  # (N, I); a view, so the kernel writes into ``out``
    check_last_dim_contiguous("x", x_rows)
    num_rows = x_rows.shape[0]
    if num_rows == 0 or inter == 0:
        return out
    interpreted = is_interpreted(_silu_and_mul_kernel)
    block = min(triton.next_power_of_2(inter), 64 if interpreted else 1024)
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x_rows,
        out_rows,
        x_rows.stride(0),
        out_rows.stride(0),
        inter,
        BLOCK=block,
        num_warps=1 if interpreted else 4,
        **pdl_args(_silu_and_mul_kernel, device),
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # (..., 2I) -> (..., I) float32
    """Torch reference of :func:`silu_and_mul`, computed in fp32."""
    gate, up = x.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
