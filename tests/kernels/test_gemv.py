from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loomserve.kernels.gemv import GemvConfig, default_gemv_config, gemv, gemv_ref, linear

# fp32: summation order only; 16-bit: the single rounding of the output.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _inputs(n, k, dtype, device, seed, bias=False):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((1, k), generator=gen, device=device, dtype=dtype)
    weight = torch.randn((n, k), generator=gen, device=device, dtype=dtype) / k**0.5
    b = torch.randn((n,), generator=gen, device=device, dtype=dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("n", "k"),
    [(8, 64), (6, 100), (33, 128), (5, 200)],  # K a multiple of the slice or not, N of the block or not
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(assert_close, device, seed, n, k, dtype):
    x, weight, _ = _inputs(n, k, dtype, device, seed)
    out = gemv(x, weight)
    assert out.shape == (1, n) and out.dtype == dtype
    assert_close(out, gemv_ref(x, weight), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_and_leading_dims(assert_close, device, dtype):
    x, weight, bias = _inputs(10, 96, dtype, device, 3, bias=True)
    x3 = x.view(1, 1, 96)
    out = gemv(x3, weight, bias)
    assert out.shape == (1, 1, 10)
    assert_close(out, gemv_ref(x3, weight, bias), TOLERANCE[dtype])


def test_strided_row_and_out(assert_close, device):
    x, weight, _ = _inputs(12, 64, torch.float32, device, 4)
    wide = torch.randn((1, 128), device=device)[:, ::2]  # one row with element stride 2
    out = torch.empty((1, 12), device=device)
    result = gemv(wide, weight, out=out)
    assert result is out
    assert_close(out, gemv_ref(wide, weight), 1e-5)
    # A weight whose rows are padded in memory (row stride > K).
    padded = torch.randn((12, 80), device=device)[:, :64]
    assert_close(gemv(x, padded), gemv_ref(x, padded), 1e-5)


def test_linear_takes_the_kernel_for_one_row_only(assert_close, device):
    x, weight, bias = _inputs(16, 64, torch.float32, device, 5, bias=True)
    assert_close(linear(x, weight, bias), F.linear(x, weight, bias), 1e-5)
    rows = torch.randn((3, 64), device=device)
    # Several rows go to F.linear, whose result the kernel would not match bit for bit.
    assert torch.equal(linear(rows, weight, bias), F.linear(rows, weight, bias))
    assert linear(rows[:0], weight).shape == (0, 16)


def test_bad_arguments(device):
    x, weight, bias = _inputs(8, 64, torch.float32, device, 0, bias=True)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn((2, 64), device=device), weight)
    with pytest.raises(ValueError, match="weight has shape"):
        gemv(x, weight[:, :32])
    with pytest.raises(ValueError, match="weight has dtype"):
        gemv(x, weight.half())
    with pytest.raises(ValueError, match="weight must be contiguous"):
        gemv(x, torch.randn((64, 8), device=device).t())
    with pytest.raises(ValueError, match="bias has shape"):
        gemv(x, weight, bias[:4])
    with pytest.raises(ValueError, match="out has shape"):
        gemv(x, weight, out=torch.empty((1, 9), device=device))
    with pytest.raises(ValueError, match="x has dtype"):
        gemv(x.to(torch.int32), weight)


def test_default_configs():
    assert default_gemv_config(4096, 4096) == GemvConfig(2, 2048, 4)
    assert default_gemv_config(2048, 14336) == GemvConfig(2, 2048, 4)
    assert default_gemv_config(128256, 100) == GemvConfig(2, 128, 4)
    assert default_gemv_config(4096, 4096, interpreted=True) == GemvConfig(2, 64, 1)


@pytest.mark.parametrize("config", [GemvConfig(1, 32, 1), GemvConfig(4, 16, 1), GemvConfig(8, 128, 1)])
def test_any_config_matches_the_reference(assert_close, device, config):
    x, weight, bias = _inputs(13, 100, torch.float32, device, 6, bias=True)
    assert_close(linear(x, weight, bias, config=config), gemv_ref(x, weight, bias), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n", "k"),
    # Llama-3.1-8B and Llama-3.2-1B projections and LM head.
    [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 2048), (2048, 8192), (128256, 2048)],
)
def test_gpu_real_shapes(assert_close, dtype, n, k):
    x, weight, bias = _inputs(n, k, dtype, torch.device("cuda"), n + k, bias=True)
    assert_close(gemv(x, weight, bias), gemv_ref(x, weight, bias), 1e-2)
