from __future__ import annotations

import pytest
import torch

from loomserve.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from loomserve.kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache


def _inputs(num_tokens, num_heads, num_kv_heads, head_dim, max_position, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    # q and k as strided views of one fused qkv output, as the model produces them.
    qkv = torch.randn(
        (num_tokens, num_heads + 2 * num_kv_heads, head_dim),
        generator=gen,
        device=device,
        dtype=dtype,
    )
    q = qkv[:, :num_heads]
    k = qkv[:, num_heads : num_heads + num_kv_heads]
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen, device=device)
    inv_freq = 500000.0 ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    cos, sin = build_cos_sin_cache(inv_freq, max_position)
    return qkv, q, k, positions, cos, sin


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 1, 16), (3, 3, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(assert_close, device, seed, num_heads, num_kv_heads, head_dim, dtype):
    qkv, q, k, positions, cos, sin = _inputs(
        7, num_heads, num_kv_heads, head_dim, 64, dtype, device, seed
    )
    v_before = qkv[:, num_heads + num_kv_heads :].clone()
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos, sin)
    apply_rotary(q, k, positions, cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(q, ref_q, tol)
    assert_close(k, ref_k, tol)
    # The value slice of the fused tensor is left alone.
    assert torch.equal(qkv[:, num_heads + num_kv_heads :], v_before)


def test_matches_hf_rotate_half(device):
    # Written out the Hugging Face way: cos/sin duplicated over both halves.
    _, q, k, positions, cos, sin = _inputs(5, 2, 1, 8, 32, torch.float32, device, 3)
    q_in = q.clone()
    apply_rotary(q, k, positions, cos, sin)
    cos_full = torch.cat([cos, cos], dim=-1)[positions][:, None]
    sin_full = torch.cat([sin, sin], dim=-1)[positions][:, None]
    rotated = torch.cat([-q_in[..., 4:], q_in[..., :4]], dim=-1)
    torch.testing.assert_close(q, q_in * cos_full + rotated * sin_full)


def test_int32_positions_and_bad_arguments(assert_close, device):
    _, q, k, positions, cos, sin = _inputs(4, 2, 2, 16, 16, torch.float32, device, 4)
    ref_q, _ = apply_rotary_ref(q, k, positions, cos, sin)
    apply_rotary(q, k, positions.to(torch.int32), cos, sin)
    assert_close(q, ref_q, 1e-5)
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rotary(q, k, positions, cos[:, :4], sin)
    with pytest.raises(ValueError, match="k has shape"):
        apply_rotary(q, k[:2], positions, cos, sin)
    with pytest.raises(ValueError, match="positions has dtype"):
        apply_rotary(q, k, positions.float(), cos, sin)
    with pytest.raises(ValueError, match="even"):
        apply_rotary(q[..., :15], k[..., :15], positions, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (32, 8, 64)])
@pytest.mark.parametrize("num_tokens", [1, 300, 8192])
def test_gpu_real_shapes(assert_close, dtype, num_heads, num_kv_heads, head_dim, num_tokens):
    device = torch.device("cuda")
    _, q, k, positions, cos, sin = _inputs(
        num_tokens, num_heads, num_kv_heads, head_dim, 131072, dtype, device, num_tokens
    )
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos, sin)
    apply_rotary(q, k, positions, cos, sin)
    assert_close(q, ref_q, 1e-2)
    assert_close(k, ref_k, 1e-2)


def _cache_case(num_tokens, num_kv_heads, head_dim, block_size, num_blocks, cache_dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:2]] = -1  # padding tokens: nothing written
    return cache.to(device), slots.to(device)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (3, 3, 24)])
@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float8_e4m3fn)],
)
def test_writing_the_cache_equals_rotary_then_reshape_and_cache(
    assert_close, device, seed, num_heads, num_kv_heads, head_dim, dtype, cache_dtype
):
    qkv, q, k, positions, cos, sin = _inputs(9, num_heads, num_kv_heads, head_dim, 64, dtype, device, seed)
    v = qkv[:, num_heads + num_kv_heads :]
    cache, slots = _cache_case(9, num_kv_heads, head_dim, 4, 6, cache_dtype, device, seed)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos, sin)
    # The two-kernel path on copies.
    qkv_2, expected_cache = qkv.clone(), cache.clone()
    q_2, k_2 = qkv_2[:, :num_heads], qkv_2[:, num_heads : num_heads + num_kv_heads]
    v_2 = qkv_2[:, num_heads + num_kv_heads :]
    apply_rotary(q_2, k_2, positions, cos, sin)
    reshape_and_cache(k_2, v_2, expected_cache, slots)

    apply_rotary(q, k, positions, cos, sin, v=v, kv_cache=cache, slot_mapping=slots)
    assert torch.equal(qkv, qkv_2)
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))
    # And against the torch references (fp32 rotation, then the cache's rounding).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(q, ref_q, tol)
    reference_cache = cache.clone()
    reshape_and_cache_ref(ref_k, v, reference_cache, slots)
    assert_close(cache.float(), reference_cache.float(), 7e-2 if cache_dtype == torch.float8_e4m3fn else tol)


def test_cache_arguments_go_together(device):
    qkv, q, k, positions, cos, sin = _inputs(3, 2, 1, 16, 16, torch.float32, device, 5)
    cache, slots = _cache_case(3, 1, 16, 4, 2, torch.float32, device, 5)
    v = qkv[:, 3:]
    with pytest.raises(ValueError, match="go together"):
        apply_rotary(q, k, positions, cos, sin, kv_cache=cache, slot_mapping=slots)
    with pytest.raises(ValueError, match="kv_cache has shape"):
        apply_rotary(q, k, positions, cos, sin, v=v, kv_cache=cache[:, :, :, :, :8], slot_mapping=slots)
    with pytest.raises(ValueError, match="slot_mapping has shape"):
        apply_rotary(q, k, positions, cos, sin, v=v, kv_cache=cache, slot_mapping=slots[:2])


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (32, 8, 64)])
def test_gpu_fused_cache_write_real_shapes(device, cache_dtype, num_heads, num_kv_heads, head_dim):
    """The fused write compiled for the GPU at the model shapes, both cache dtypes: the same
    bytes as rotary then reshape_and_cache (compiling is what the interpreter cannot check)."""
    qkv, q, k, positions, cos, sin = _inputs(256, num_heads, num_kv_heads, head_dim, 8192, torch.bfloat16,
                                             device, 3)
    v = qkv[:, num_heads + num_kv_heads :]
    cache, slots = _cache_case(256, num_kv_heads, head_dim, 16, 64, cache_dtype, device, 3)
    qkv_2, expected_cache = qkv.clone(), cache.clone()
    q_2, k_2 = qkv_2[:, :num_heads], qkv_2[:, num_heads : num_heads + num_kv_heads]
    apply_rotary(q_2, k_2, positions, cos, sin)
    reshape_and_cache(k_2, qkv_2[:, num_heads + num_kv_heads :], expected_cache, slots)
    apply_rotary(q, k, positions, cos, sin, v=v, kv_cache=cache, slot_mapping=slots)
    assert torch.equal(qkv, qkv_2)
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))


def test_fused_fp8_write_stores_nan_as_zero(device):
    """Like reshape_and_cache, the fused write never leaves a NaN byte in an FP8 cache."""
    qkv, q, k, positions, cos, sin = _inputs(5, 4, 2, 16, 16, torch.float32, device, 6)
    cache, slots = _cache_case(5, 2, 16, 4, 3, torch.float8_e4m3fn, device, 6)
    first, second = (int(t) for t in (slots >= 0).nonzero()[:2, 0])
    qkv[first, 4:6] = float("nan")  # all of one token's keys
    qkv[second, 6, :3] = float("nan")  # part of another token's first value head
    apply_rotary(q, k, positions, cos, sin, v=qkv[:, 6:], kv_cache=cache, slot_mapping=slots)
    assert not cache.float().isnan().any()
    raw = cache.view(torch.uint8)
    s1, s2 = int(slots[first]), int(slots[second])
    assert raw[0, s1 // 4, s1 % 4].eq(0).all()
    assert raw[1, s2 // 4, s2 % 4, 0, :3].eq(0).all()
