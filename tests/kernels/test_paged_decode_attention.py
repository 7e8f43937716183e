from __future__ import annotations

import random

import pytest
import torch

from loomserve.kernels import KV_FP8
from loomserve.kernels.paged_decode_attention import (
    MAX_SPLITS,
    MIN_SPLIT_TOKENS,
    DecodeConfig,
    choose_num_splits,
    default_decode_config,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from loomserve.kernels.reshape_and_cache import reshape_and_cache_ref
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.attention.triton_backend import TritonAttentionBackend


def _decode_batch(paged_batch, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    return paged_batch(
        query_lens=[1] * len(context_lens),
        prefix_lens=[n - 1 for n in context_lens],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
    )


def _run(batch, num_splits=None, out=None, config=None):
    return paged_decode_attention(
        batch.q,
        batch.kv_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.scale,
        batch.max_seq_len,
        num_splits=num_splits,
        out=out,
        config=config,
    )


def _ref(batch):
    return paged_decode_attention_ref(
        batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.scale
    )


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize(("num_splits", "block_size"), [(1, 4), (3, 16), (None, 4)])
def test_matches_reference(paged_batch, assert_close, num_heads, num_kv_heads, num_splits, block_size):
    # Lengths 1, a block boundary, and lengths that leave some of the splits empty.
    batch = _decode_batch(
        paged_batch, [1, 16, 37, 70], num_heads, num_kv_heads, 32, block_size, torch.float32, 7
    )
    assert_close(_run(batch, num_splits), _ref(batch), 1e-4)


@pytest.mark.parametrize("seed", [100, 101, 102])
def test_random_batches(paged_batch, assert_close, seed):
    rng = random.Random(seed)
    num_heads, num_kv_heads = rng.choice([(4, 4), (4, 1), (8, 1), (8, 2)])
    context_lens = [rng.randint(1, 120) for _ in range(rng.randint(1, 5))]
    batch = _decode_batch(
        paged_batch,
        context_lens,
        num_heads,
        num_kv_heads,
        rng.choice([32, 64]),
        rng.choice([4, 16]),
        torch.float32,
        seed,
    )
    assert_close(_run(batch, rng.choice([None, 1, 2, 5])), _ref(batch), 1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_odd_head_dim_and_fp16(paged_batch, assert_close, seed):
    batch = _decode_batch(paged_batch, [5, 50], 4, 2, 40, 8, torch.float16, seed)
    assert_close(_run(batch, num_splits=2), _ref(batch), 1e-2)


def test_empty_context_gives_zeros(paged_batch, device):
    batch = _decode_batch(paged_batch, [3, 20], 2, 1, 16, 4, torch.float32, 0)
    seq_lens = torch.tensor([0, 20], dtype=torch.int32, device=device)
    for num_splits in (1, 2):
        out = paged_decode_attention(
            batch.q, batch.kv_cache, batch.block_tables, seq_lens, batch.scale, 20, num_splits
        )
        assert torch.all(out[0] == 0)
        assert torch.isfinite(out).all()


def test_choose_num_splits():
    # A big batch fills the GPU by itself.
    assert choose_num_splits(256, 8, 8192, 132) == 1
    # One long sequence: split until ~2 programs per SM.
    assert choose_num_splits(1, 8, 8192, 132) == 8192 // MIN_SPLIT_TOKENS
    assert choose_num_splits(1, 1, 1 << 20, 132) == MAX_SPLITS
    # A short context is not split below MIN_SPLIT_TOKENS.
    assert choose_num_splits(1, 8, MIN_SPLIT_TOKENS, 132) == 1
    assert choose_num_splits(0, 8, 0, 132) == 1


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("config", [DecodeConfig(32, 2, 1), DecodeConfig(64, 1, 2)])
def test_launch_config_does_not_change_results(paged_batch, assert_close, fp8, config):
    """Tiles wider than a cache block (keys from several blocks per tile), fewer or more
    warps and stages: the result is the reference's, with an FP8 cache too."""
    batch = _decode_batch(paged_batch, [1, 40, 97], 8, 2, 32, 16, torch.float32, 3)
    if fp8:
        batch.kv_cache = batch.kv_cache.to(KV_FP8)
    expected = _ref(batch)
    for num_splits in (1, 2):
        assert_close(_run(batch, num_splits, config=config), expected, 1e-3 if fp8 else 1e-4)


def test_default_launch_configs():
    # bf16 reads run at the copy bandwidth with 64-key tiles; an FP8 cache takes 128-key tiles.
    assert default_decode_config(128, torch.bfloat16, torch.bfloat16) == DecodeConfig(64, 4, 2)
    assert default_decode_config(128, torch.bfloat16, KV_FP8) == DecodeConfig(128, 4, 3)
    assert default_decode_config(64, torch.bfloat16, KV_FP8) == DecodeConfig(128, 4, 2)
    assert default_decode_config(128, torch.float32, torch.float32) == DecodeConfig(32, 4, 2)
    assert default_decode_config(128, torch.bfloat16, KV_FP8, interpreted=True) == DecodeConfig(16, 1, 1)


def test_rejects_bad_arguments(paged_batch):
    batch = _decode_batch(paged_batch, [3], 2, 1, 16, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="num_splits"):
        _run(batch, num_splits=MAX_SPLITS + 1)
    with pytest.raises(ValueError, match="seq_lens has shape"):
        paged_decode_attention(
            batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens[:0], 1.0, 3
        )
    with pytest.raises(ValueError, match="out has dtype"):
        _run(batch, out=torch.empty_like(batch.q, dtype=torch.float16))


@pytest.mark.parametrize("num_padding", [0, 2])
def test_backend_decode_batch(paged_batch, assert_close, num_padding):
    batch = _decode_batch(paged_batch, [9, 33, 1], 4, 1, 32, 4, torch.float32, 3)
    gen = torch.Generator().manual_seed(4)
    num_tokens = 3 + num_padding
    device = batch.q.device
    q = torch.randn((num_tokens, 4, 32), generator=gen).to(device)
    k = torch.randn((num_tokens, 1, 32), generator=gen).to(device)
    v = torch.randn((num_tokens, 1, 32), generator=gen).to(device)
    slot_mapping = torch.cat([batch.slot_mapping, batch.slot_mapping.new_full((num_padding,), -1)])
    meta = AttentionMetadata(
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        block_tables=batch.block_tables,
        slot_mapping=slot_mapping,
        max_query_len=1,
        max_seq_len=33,
        query_start_loc_cpu=[0, 1, 2, 3],
        seq_lens_cpu=[9, 33, 1],
    )
    expected_cache = batch.kv_cache.clone()
    reshape_and_cache_ref(k, v, expected_cache, slot_mapping)
    expected = paged_decode_attention_ref(
        q[:3], expected_cache, batch.block_tables, batch.seq_lens, batch.scale
    )
    out = TritonAttentionBackend(4, 1, 32, batch.scale).forward(q, k, v, batch.kv_cache, meta)
    assert torch.equal(batch.kv_cache, expected_cache)
    assert_close(out[:3], expected, 1e-4)
    assert torch.all(out[3:] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 32), (32, 8), (32, 4), (16, 2)])
@pytest.mark.parametrize("batch_size", [1, 7, 64, 256])
def test_gpu_real_shapes(
    paged_batch, assert_close, seed, dtype, head_dim, num_heads, num_kv_heads, batch_size
):
    rng = random.Random(seed * 7919 + batch_size * 31 + head_dim + num_kv_heads)
    longest = 8192 if batch_size <= 7 else 2048
    context_lens = [rng.randint(1, longest) for _ in range(batch_size)]
    context_lens[0] = longest
    batch = _decode_batch(
        paged_batch, context_lens, num_heads, num_kv_heads, head_dim, 16, dtype, seed
    )
    expected = _ref(batch)
    assert_close(_run(batch), expected, 1e-2)
    assert_close(_run(batch, num_splits=1), expected, 1e-2)
    assert_close(_run(batch, num_splits=MAX_SPLITS), expected, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("context_len", [1, 15, 16, 17, 255, 256, 257, 4097])
def test_gpu_context_boundaries(paged_batch, assert_close, context_len):
    batch = _decode_batch(paged_batch, [context_len] * 3, 32, 8, 128, 16, torch.bfloat16, 5)
    for num_splits in (None, 1, 2, 5):
        assert_close(_run(batch, num_splits), _ref(batch), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_fp32(paged_batch, assert_close, head_dim):
    batch = _decode_batch(paged_batch, [1, 300, 5000], 32, 8, head_dim, 16, torch.float32, 6)
    for num_splits in (None, 1):
        assert_close(_run(batch, num_splits), _ref(batch), 1e-4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache_matches_reference(paged_batch, assert_close, seed, num_splits):
    """An FP8 (e4m3) cache: the kernel converts its bytes in registers; the reference
    reads the same rounded values, so only the arithmetic differs (fp16 dots over FP8)."""
    batch = _decode_batch(paged_batch, [1, 17, 70], 8, 2, 32, 4, torch.float32, seed)
    batch.kv_cache = batch.kv_cache.to(torch.float8_e4m3fn)
    assert_close(_run(batch, num_splits), _ref(batch), 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch_size", [1, 64, 256])
def test_gpu_fp8_cache_real_shapes(paged_batch, assert_close, head_dim, batch_size):
    rng = random.Random(batch_size + head_dim)
    longest = 8192 if batch_size == 1 else 2048
    context_lens = [longest] + [rng.randint(1, longest) for _ in range(batch_size - 1)]
    batch = _decode_batch(paged_batch, context_lens, 32, 8, head_dim, 16, torch.bfloat16, 4)
    batch.kv_cache = batch.kv_cache.to(torch.float8_e4m3fn)
    expected = _ref(batch)
    assert_close(_run(batch), expected, 1e-2)
    assert_close(_run(batch, num_splits=1), expected, 1e-2)
