from __future__ import annotations

import pytest
import torch

from loomserve.kernels.activation import silu_and_mul, silu_and_mul_ref


def _inputs(shape, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return 3.0 * torch.randn(shape, generator=gen, device=device, dtype=dtype)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("inter", [16, 100, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(assert_close, device, seed, inter, dtype):
    x = _inputs((5, 2 * inter), dtype, device, seed)
    out = silu_and_mul(x)
    assert out.shape == (5, inter) and out.dtype == dtype
    assert_close(out, silu_and_mul_ref(x), 1e-5 if dtype == torch.float32 else 1e-2)


def test_batched_strided_input_and_out(assert_close, device):
    x = _inputs((2, 3, 80), torch.float32, device, 2)[:, :, :64]  # row stride 80
    out = torch.empty((2, 3, 32), device=device)
    result = silu_and_mul(x, out=out)
    assert result is out
    assert_close(out, silu_and_mul_ref(x), 1e-5)


def test_empty_and_bad_arguments(device):
    x = _inputs((4, 32), torch.float32, device, 0)
    assert silu_and_mul(x[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(x[:, :31])
    with pytest.raises(ValueError, match="out has shape"):
        silu_and_mul(x, out=torch.empty((4, 32), device=device))
    with pytest.raises(ValueError, match="out has dtype"):
        silu_and_mul(x, out=torch.empty((4, 16), device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        silu_and_mul(x, out=torch.empty((16, 4), device=device).t())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter", [8192, 14336])
@pytest.mark.parametrize("num_tokens", [1, 257, 8192])
def test_gpu_real_shapes(assert_close, dtype, inter, num_tokens):
    x = _inputs((num_tokens, 2 * inter), dtype, torch.device("cuda"), num_tokens)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x), 1e-2)
