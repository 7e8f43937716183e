from __future__ import annotations

import pytest
import torch

from loomserve.kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)


def _inputs(shape, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    residual = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    weight = 1.0 + 0.1 * torch.randn(shape[-1], generator=gen, device=device, dtype=dtype)
    return x, residual, weight


# fp32 tolerances cover rsqrt's few ulps; 16-bit ones the single rounding of the output.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm(assert_close, device, seed, hidden, dtype):
    x, _, weight = _inputs((5, hidden), dtype, device, seed)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, rms_norm_ref(x, weight, 1e-6), TOLERANCE[dtype])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_add_rms_norm(assert_close, device, seed, hidden, dtype):
    x, residual, weight = _inputs((3, 2, hidden), dtype, device, seed)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert_close(new_residual, ref_residual, TOLERANCE[dtype])
    assert_close(out, ref_out, TOLERANCE[dtype])
    # Inputs are not modified.
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_strided_rows_and_fp32_weight(assert_close, device):
    x, _, weight = _inputs((6, 96), torch.float16, device, 2)
    rows = x[::2, :64]  # row stride 192, last dim contiguous
    out = rms_norm(rows, weight[:64].float(), 1e-6)
    assert_close(out, rms_norm_ref(rows, weight[:64].float(), 1e-6), 1e-2)


def test_empty_and_bad_arguments(device):
    x, residual, weight = _inputs((4, 32), torch.float32, device, 0)
    assert rms_norm(x[:0], weight, 1e-6).shape == (0, 32)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, weight[:16], 1e-6)
    with pytest.raises(ValueError, match="residual has shape"):
        fused_add_rms_norm(x, residual[:2], weight, 1e-6)
    with pytest.raises(ValueError, match="residual has dtype"):
        fused_add_rms_norm(x, residual.half(), weight, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, weight, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(x.t(), weight[:4], 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [2048, 4096, 8192])
@pytest.mark.parametrize("num_tokens", [1, 257, 8192])
def test_gpu_real_shapes(assert_close, dtype, hidden, num_tokens):
    device = torch.device("cuda")
    x, residual, weight = _inputs((num_tokens, hidden), dtype, device, num_tokens)
    assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), 1e-2)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert_close(new_residual, ref_residual, 1e-2)
    assert_close(out, ref_out, 1e-2)
