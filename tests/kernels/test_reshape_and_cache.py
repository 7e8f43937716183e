from __future__ import annotations

import pytest
import torch

from loomserve.kernels import FP8_MAX, KV_FP8, to_cache_dtype
from loomserve.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref


def _random_case(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    num_skipped: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # k and v as strided slices of one fused projection, like the model produces them.
    kv = torch.randn((num_tokens, 2, num_kv_heads, head_dim), generator=gen).to(dtype)
    cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:num_skipped]] = -1
    kv = kv.to(device)
    return kv[:, 0], kv[:, 1], cache.to(dtype).to(device), slots.to(device)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(seed: int, block_size: int, dtype: torch.dtype, device: torch.device):
    key, value, cache, slots = _random_case(13, 2, 24, block_size, 7, dtype, device, seed, 3)
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize(("num_tokens", "num_kv_heads", "head_dim"),
                         [(37, 3, 24), (1, 8, 128), (70, 1, 64), (5, 8, 64)])
def test_tiles_of_several_tokens(num_tokens: int, num_kv_heads: int, head_dim: int, device: torch.device):
    """A program copies several tokens' rows, all heads of each: token counts that leave its
    last tile partly empty, head counts and dims below their power of two, skipped slots."""
    key, value, cache, slots = _random_case(num_tokens, num_kv_heads, head_dim, 4, num_tokens, torch.float16, device,
                                            num_tokens, num_tokens // 3)
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)


def test_skip_slots_leave_cache_untouched(device: torch.device):
    key, value, cache, slots = _random_case(5, 1, 16, 4, 3, torch.float32, device, 0, 0)
    slots[:] = -1
    before = cache.clone()
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache, before)


def test_int32_slots_and_empty_batch(device: torch.device):
    key, value, cache, slots = _random_case(6, 2, 16, 4, 4, torch.float32, device, 2, 1)
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots.to(torch.int32))
    assert torch.equal(cache, expected)
    reshape_and_cache(key[:0], value[:0], cache, slots[:0])
    assert torch.equal(cache, expected)


def test_rejects_bad_arguments(device: torch.device):
    key, value, cache, slots = _random_case(4, 2, 16, 4, 2, torch.float32, device, 0, 0)
    with pytest.raises(ValueError, match="value has shape"):
        reshape_and_cache(key, value[:, :1], cache, slots)
    with pytest.raises(ValueError, match="kv_cache has dtype"):
        reshape_and_cache(key, value, cache.half(), slots)
    with pytest.raises(ValueError, match="slot_mapping has dtype"):
        reshape_and_cache(key, value, cache, slots.float())
    with pytest.raises(ValueError, match="kv_cache has shape"):
        reshape_and_cache(key, value, cache[:, :, :, :1], slots)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        reshape_and_cache(key.transpose(1, 2).contiguous().transpose(1, 2), value, cache, slots)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="one device"):
            reshape_and_cache(key, value, cache, slots.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(8, 128), (8, 64), (4, 128)])
def test_gpu_real_shapes(dtype: torch.dtype, num_kv_heads: int, head_dim: int):
    device = torch.device("cuda")
    key, value, cache, slots = _random_case(
        4096, num_kv_heads, head_dim, 16, 2048, dtype, device, 3, 100
    )
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_cache_gets_the_rounded_saturated_bytes(dtype: torch.dtype, device: torch.device):
    """Into an FP8 (e4m3) cache: each value rounded to nearest, and values past +-448
    saturated, exactly as ``kernels.to_cache_dtype`` (the reference) stores them."""
    key, value, _, slots = _random_case(13, 2, 24, 4, 7, dtype, device, 5, 3)
    key = key * 30  # some past the e4m3 range
    first = int((slots >= 0).nonzero()[0])
    key[first, 0, :3] = torch.tensor([1e4, -1e4, 449.0], dtype=dtype)
    cache = torch.zeros((2, 7, 4, 2, 24), dtype=torch.float8_e4m3fn, device=device)
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    written = cache.float()
    assert written.abs().max() == 448.0 and written.isfinite().all()
    slot = int(slots[first])
    assert written[0, slot // 4, slot % 4, 0, :3].tolist() == [448.0, -448.0, 448.0]


def test_fp8_rounding_equals_torchs_cast_everywhere(device: torch.device):
    """Every finite e4m3 value, every midpoint between two of them (ties go to even), zeros
    of both signs, values past the range, and random values at two scales."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[values.isfinite()].sort().values
    gen = torch.Generator().manual_seed(9)
    x = torch.cat([
        values,
        (values[1:] + values[:-1]) / 2,
        torch.tensor([0.0, -0.0, 449.0, -460.0, 464.0, 1e5, -1e5]),
        torch.randn(3_000, generator=gen) * 40,
        torch.randn(3_000, generator=gen) * 0.01,
    ])
    x = torch.cat([x, x.new_zeros(-len(x) % 16)]).view(-1, 1, 16).to(device)
    tokens = x.shape[0]
    cache = torch.zeros((2, tokens, 1, 1, 16), dtype=torch.float8_e4m3fn, device=device)
    reshape_and_cache(x, -x, cache, torch.arange(tokens, device=device))
    # Past the range, torch's own cast saturates in torch 2.13 but gives NaN in 2.11: the
    # reference clamps first, then rounds with torch's cast.
    assert torch.equal(cache[0].view(torch.uint8).flatten(), to_cache_dtype(x, KV_FP8).flatten())
    assert torch.equal(cache[1].view(torch.uint8).flatten(), to_cache_dtype(-x, KV_FP8).flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_stores_nan_as_zero(dtype: torch.dtype, device: torch.device):
    """The kernel and the reference store a NaN as +0 in an FP8 cache, never as a NaN byte."""
    key, value, _, slots = _random_case(6, 2, 16, 4, 3, dtype, device, 4, 0)
    key, value = key.clone(), value.clone()
    key[0, 0, :4] = float("nan")
    value[1, 1, 5:] = float("nan")
    for write in (reshape_and_cache, reshape_and_cache_ref):
        cache = torch.full((2, 3, 4, 2, 16), 1.0, dtype=KV_FP8, device=device)
        write(key, value, cache, slots)
        raw = cache.view(torch.uint8)
        assert not cache.float().isnan().any()
        k0, v1 = int(slots[0]), int(slots[1])
        assert raw[0, k0 // 4, k0 % 4, 0, :4].eq(0).all()
        assert raw[1, v1 // 4, v1 % 4, 1, 5:].eq(0).all()


def test_to_cache_dtype():
    x = torch.tensor([1.0, -2.5, 1e4, -1e4, float("inf"), float("nan"), 0.3])
    # The compute dtype is a plain cast (a NaN stays NaN there).
    assert torch.allclose(to_cache_dtype(x, torch.bfloat16).float(), x.to(torch.bfloat16).float(), equal_nan=True)
    fp8 = to_cache_dtype(x, KV_FP8)
    assert fp8.dtype == torch.uint8
    assert fp8.view(KV_FP8).float().tolist()[:6] == [1.0, -2.5, FP8_MAX, -FP8_MAX, FP8_MAX, 0.0]
    assert fp8[5] == 0  # NaN is stored as +0, never as a NaN byte
