"""RMSNorm, plain and fused with the residual add that precedes it in a Llama block.

The normalisation is computed in fp32 and rounded once, on store. (The Hugging
Face module also rounds the normalised value before the weight multiply; that
second rounding is skipped here because it only adds error.) The fused variant
rounds the sum to the activation dtype first and normalises that, so it equals
``residual = x + residual; rms_norm(residual)`` done unfused in that dtype.
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

# One program holds a whole row in registers.
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (see kernels/__init__.py)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden
    out = x * tl.rsqrt(mean_square + eps) * weight
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:  # (..., H) -> (N, H)
    rows = tensor.reshape(-1, tensor.shape[-1])
    check_last_dim_contiguous(name, rows)
    return rows


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, **others: torch.Tensor) -> int:
    """Validate the arguments; return the hidden size."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    hidden = x.shape[-1]
    check_dtype("x", x, FLOAT_DTYPES)
    check_shape("weight", weight, (hidden,))
    check_dtype("weight", weight, FLOAT_DTYPES)
    for name, tensor in others.items():
        if tensor.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, x has {tuple(x.shape)}")
        check_same_dtype(x=x, **{name: tensor})
    check_devices(_rms_norm_kernel, x=x, weight=weight, **others)
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds the supported {MAX_HIDDEN}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return hidden


def _launch(
    x_rows: torch.Tensor,  # (N, H)
    residual_rows: torch.Tensor | None,  # (N, H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    out_rows: torch.Tensor,  # (N, H)
    residual_out_rows: torch.Tensor | None,  # (N, H)
) -> None:
    num_rows, hidden = x_rows.shape
    if num_rows == 0 or hidden == 0:
        return
    has_residual = residual_rows is not None and residual_out_rows is not None
    # Without a residual the kernel never touches these pointers; any tensor will do.
    res_in = residual_rows if residual_rows is not None else x_rows
    res_out = residual_out_rows if residual_out_rows is not None else out_rows
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x_rows,
        res_in,
        weight,
        out_rows,
        res_out,
        x_rows.stride(0),
        res_in.stride(0),
        out_rows.stride(0),
        res_out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=has_residual,
        BLOCK=block,
        # About 16 elements per thread: 16 warps for a 4096-wide row, fewer when narrower.
        num_warps=1 if is_interpreted(_rms_norm_kernel) else min(16, max(1, block // 512)),
        **pdl_args(_rms_norm_kernel, x_rows.device),
    )


def rms_norm(
    x: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
) -> torch.Tensor:  # (..., H), dtype of x
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dimension."""
    hidden = _check(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_as_rows("x", x), None, weight, eps, out.view(-1, hidden), None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # (..., H)
    residual: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normalised, new residual), both (..., H)
    """``new_residual = x + residual``; returns ``(rms_norm(new_residual), new_residual)``."""
    hidden = _check(x, weight, eps, residual=residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(
        _as_rows("x", x),
        _as_rows("residual", residual),
        weight,
        eps,
        out.view(-1, hidden),
        new_residual.view(-1, hidden),
    )
    return out, new_residual


def rms_norm_ref(
    x: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
) -> torch.Tensor:  # (..., H) float32
    """Torch reference of :func:`rms_norm`, computed in fp32."""
    x = x.float()
    return weight.float() * x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def fused_add_rms_norm_ref(
    x: torch.Tensor,  # (..., H)
    residual: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # both (..., H) float32
    """Torch reference of :func:`fused_add_rms_norm`, computed in fp32."""
    summed = x.float() + residual.float()
    return rms_norm_ref(summed, weight, eps), summed
