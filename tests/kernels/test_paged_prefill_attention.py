from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from loomserve.kernels.paged_prefill_attention import (
    LaunchConfig,
    _launch_config,
    default_launch_config,
    fill_work_list,
    group_pad,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_block_tokens,
    work_list_size,
)
from loomserve.kernels.reshape_and_cache import reshape_and_cache_ref
from loomserve.worker.attention.base import AttentionMetadata, StaticLayout
from loomserve.worker.attention.triton_backend import TritonAttentionBackend


def _run(batch, out=None):
    return paged_prefill_attention(
        batch.q,
        batch.kv_cache,
        batch.query_start_loc,
        batch.seq_lens,
        batch.block_tables,
        batch.scale,
        batch.max_query_len,
        out=out,
    )


def _ref(batch):
    return paged_prefill_attention_ref(
        batch.q,
        batch.kv_cache,
        batch.query_start_loc,
        batch.seq_lens,
        batch.block_tables,
        batch.scale,
    )


# (query_lens, prefix_lens): fresh prompts, prefixes that are and are not multiples of
# the block size, a decode row inside a prefill batch, and a sequence with no new token.
CPU_BATCHES = [
    ([9], [0]),
    ([20, 3, 1], [0, 7, 33]),
    ([17, 0, 5], [16, 5, 18]),
]


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("case", range(len(CPU_BATCHES)))
def test_matches_reference(paged_batch, assert_close, num_heads, num_kv_heads, case):
    query_lens, prefix_lens = CPU_BATCHES[case]
    batch = paged_batch(
        query_lens=query_lens,
        prefix_lens=prefix_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=32,
        block_size=4 if case % 2 else 16,
        dtype=torch.float32,
        seed=case,
    )
    assert_close(_run(batch), _ref(batch), 1e-4)


@pytest.mark.parametrize("seed", [100, 101, 102])
def test_random_batches(paged_batch, assert_close, seed):
    rng = random.Random(seed)
    num_heads, num_kv_heads = rng.choice([(4, 4), (4, 1), (8, 1), (8, 2)])
    num_seqs = rng.randint(1, 4)
    batch = paged_batch(
        query_lens=[rng.randint(1, 40) for _ in range(num_seqs)],
        prefix_lens=[rng.choice([0, rng.randint(1, 60)]) for _ in range(num_seqs)],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=rng.choice([32, 64]),
        block_size=rng.choice([4, 16]),
        dtype=torch.float32,
        seed=seed,
    )
    assert_close(_run(batch), _ref(batch), 1e-4)


@pytest.mark.parametrize("seed", [3, 4])
def test_odd_head_dim_and_fp16(paged_batch, assert_close, seed):
    # head_dim 40 pads to a 64-wide tile; fp16 exercises the 16-bit casts.
    batch = paged_batch(
        query_lens=[6, 18],
        prefix_lens=[13, 2],
        num_heads=4,
        num_kv_heads=2,
        head_dim=40,
        block_size=8,
        dtype=torch.float16,
        seed=seed,
    )
    assert_close(_run(batch), _ref(batch), 1e-2)


def test_writes_into_out_and_leaves_other_rows(paged_batch, device):
    batch = paged_batch(
        query_lens=[3, 2],
        prefix_lens=[4, 0],
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        block_size=4,
        dtype=torch.float32,
        seed=5,
    )
    out = torch.full((7, 2, 16), 7.0, device=device)  # 2 rows past the batch
    result = _run(batch, out=out[:5])
    assert result.data_ptr() == out.data_ptr()
    assert torch.all(out[5:] == 7.0)


def test_rejects_bad_arguments(paged_batch):
    batch = paged_batch(
        query_lens=[2],
        prefix_lens=[1],
        num_heads=3,
        num_kv_heads=1,
        head_dim=16,
        block_size=4,
        dtype=torch.float32,
        seed=0,
    )
    args = (batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, 1.0, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_prefill_attention(batch.q, batch.kv_cache[:, :, :, [0, 0]], *args[1:])
    with pytest.raises(ValueError, match="kv_cache has dtype"):
        paged_prefill_attention(batch.q.half(), *args)
    qsl, seq_lens, tables = batch.query_start_loc, batch.seq_lens, batch.block_tables
    with pytest.raises(ValueError, match="seq_lens has dtype"):
        paged_prefill_attention(batch.q, batch.kv_cache, qsl, seq_lens.long(), tables, 1.0, 2)
    with pytest.raises(ValueError, match="query_start_loc has shape"):
        paged_prefill_attention(batch.q, batch.kv_cache, qsl[:1], seq_lens, tables, 1.0, 2)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(batch.q, batch.kv_cache, qsl, seq_lens, tables, 1.0, -1)


# --- work lists (the launch shape of CUDA graphs of mixed steps) --------------


@pytest.mark.parametrize("seed", range(5))
def test_work_list_covers_every_query_block_once(seed):
    rng = np.random.default_rng(seed)
    q_lens = rng.choice([0, 1, 1, 5, 16, 17, 40], size=int(rng.integers(1, 12)))
    starts = np.concatenate(([0], np.cumsum(q_lens))).astype(np.int32)
    first = int(rng.integers(0, len(q_lens) + 1))
    block_tokens = int(rng.choice([1, 4, 16]))
    size = work_list_size(int(starts[-1]), len(q_lens), block_tokens)
    out = np.full((2, size + 3), 99, dtype=np.int32)
    count = fill_work_list(starts, first, block_tokens, out)
    expected = [(s, b) for s in range(first, len(q_lens)) for b in range(-(-int(q_lens[s]) // block_tokens))]
    assert count == len(expected) <= size
    assert list(zip(out[0, :count].tolist(), out[1, :count].tolist(), strict=True)) == expected
    assert (out[:, count:] == -1).all()


def test_work_list_overflow_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        fill_work_list(np.array([0, 40], dtype=np.int32), 0, 16, np.zeros((2, 2), dtype=np.int32))


def _group(batch) -> int:
    return batch.q.shape[1] // batch.kv_cache.shape[3]


def _work(batch, first_seq: int, extra: int, device, block_tokens: int | None = None) -> torch.Tensor:
    if block_tokens is None:
        block_tokens = prefill_block_tokens(batch.q.shape[2], batch.max_query_len, batch.q.dtype, group=_group(batch))
    size = work_list_size(batch.q.shape[0], len(batch.query_lens), block_tokens) + extra
    host = np.zeros((2, size), dtype=np.int32)
    fill_work_list(batch.query_start_loc.cpu().numpy(), first_seq, block_tokens, host)
    return torch.from_numpy(host).to(device)


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_work_list_launch_matches_reference_and_skips_the_rest(paged_batch, assert_close, device, seed):
    """A launch over a work list equals the full launch on the listed sequences and
    leaves the rows of unlisted ones (leading decodes) untouched."""
    rng = random.Random(seed)
    num_decodes = rng.randint(0, 3)
    query_lens = [1] * num_decodes + [rng.randint(1, 40) for _ in range(rng.randint(1, 3))]
    batch = paged_batch(
        query_lens=query_lens,
        prefix_lens=[rng.randint(0, 50) for _ in query_lens],
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        block_size=rng.choice([4, 16]),
        dtype=torch.float32,
        seed=seed,
    )
    out = torch.full_like(batch.q, 7.0)
    _run_work = paged_prefill_attention(
        batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, batch.scale,
        batch.max_query_len, out=out, work=_work(batch, num_decodes, extra=5, device=device),
    )
    assert _run_work.data_ptr() == out.data_ptr()
    assert torch.all(out[:num_decodes] == 7.0)
    assert_close(out[num_decodes:], _ref(batch)[num_decodes:], 1e-4)


def test_work_list_is_checked(paged_batch, device):
    batch = paged_batch(query_lens=[3], prefix_lens=[0], num_heads=2, num_kv_heads=1, head_dim=16, block_size=4,
                        dtype=torch.float32, seed=0)
    args = (batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, 1.0, 3)
    with pytest.raises(ValueError, match="work has dtype"):
        paged_prefill_attention(*args, work=torch.zeros((2, 4), dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="work has shape"):
        paged_prefill_attention(*args, work=torch.zeros((3, 4), dtype=torch.int32, device=device))


def _metadata(batch, num_padding: int) -> AttentionMetadata:
    return AttentionMetadata(
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        block_tables=batch.block_tables,
        slot_mapping=torch.cat(
            [batch.slot_mapping, batch.slot_mapping.new_full((num_padding,), -1)]
        ),
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
        query_start_loc_cpu=batch.query_start_loc.tolist(),
        seq_lens_cpu=batch.seq_lens.tolist(),
    )


def _backend_case(batch, num_padding: int, seed: int):
    """New k/v for every token of ``batch`` plus padding rows; expected cache and output."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = batch.q.shape[0] + num_padding
    _, num_heads, head_dim = batch.q.shape
    num_kv_heads = batch.kv_cache.shape[3]
    device, dtype = batch.q.device, batch.q.dtype
    q = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(dtype).to(device)
    k = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(dtype).to(device)
    v = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(dtype).to(device)
    meta = _metadata(batch, num_padding)
    expected_cache = batch.kv_cache.clone()
    reshape_and_cache_ref(k, v, expected_cache, meta.slot_mapping)
    expected = paged_prefill_attention_ref(
        q, expected_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, batch.scale
    )
    return q, k, v, meta, expected_cache, expected


@pytest.mark.parametrize("num_padding", [0, 3])
def test_backend_mixed_batch(paged_batch, assert_close, num_padding):
    batch = paged_batch(
        query_lens=[7, 1, 12, 1],
        prefix_lens=[5, 20, 0, 3],
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        block_size=4,
        dtype=torch.float32,
        seed=11,
    )
    q, k, v, meta, expected_cache, expected = _backend_case(batch, num_padding, seed=12)
    backend = TritonAttentionBackend(4, 1, 32, batch.scale)
    out = backend.forward(q, k, v, batch.kv_cache, meta)
    assert torch.equal(batch.kv_cache, expected_cache)
    assert_close(out, expected, 1e-4)
    assert torch.all(out[q.shape[0] - num_padding :] == 0)


def _static_metadata(batch, num_padding: int, num_decodes: int, decode_rows: int, device) -> AttentionMetadata:
    """The metadata of a CUDA graph of mixed steps: a work list and a fixed number of
    decode rows, host lists empty, max_query_len the padded token count."""
    num_tokens = batch.q.shape[0] + num_padding
    meta = _metadata(batch, num_padding)
    block_tokens = prefill_block_tokens(batch.q.shape[2], num_tokens, batch.q.dtype, group=_group(batch))
    work = np.zeros((2, work_list_size(num_tokens, len(batch.query_lens), block_tokens)), dtype=np.int32)
    fill_work_list(batch.query_start_loc.cpu().numpy(), num_decodes, block_tokens, work)
    decode_lens = torch.zeros(decode_rows, dtype=torch.int32, device=device)
    decode_lens[:num_decodes] = batch.seq_lens[:num_decodes]
    meta.max_query_len = num_tokens
    meta.query_start_loc_cpu, meta.seq_lens_cpu = [], []
    meta.static = StaticLayout(decode_lens, torch.from_numpy(work).to(device), block_tokens)
    return meta


@pytest.mark.parametrize("num_padding", [0, 4])
def test_backend_static_layout(paged_batch, assert_close, device, num_padding):
    """The launches of a graph of mixed steps: decodes first through the decode kernel
    over more rows than there are decodes, the rest through a work list."""
    batch = paged_batch(
        query_lens=[1, 1, 1, 9, 1, 14],
        prefix_lens=[5, 30, 0, 6, 19, 0],
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        block_size=4,
        dtype=torch.float32,
        seed=31,
    )
    q, k, v, _, expected_cache, expected = _backend_case(batch, num_padding, seed=32)
    meta = _static_metadata(batch, num_padding, num_decodes=3, decode_rows=6, device=device)
    out = TritonAttentionBackend(4, 2, 32, batch.scale).forward(q, k, v, batch.kv_cache, meta)
    assert torch.equal(batch.kv_cache, expected_cache)
    assert_close(out, expected, 1e-4)
    assert torch.all(out[q.shape[0] - num_padding :] == 0)


def test_backend_static_layout_checks_the_block_size(paged_batch, device):
    batch = paged_batch(query_lens=[1, 5], prefix_lens=[3, 0], num_heads=2, num_kv_heads=1, head_dim=16,
                        block_size=4, dtype=torch.float32, seed=2)
    q, k, v, *_ = _backend_case(batch, 0, seed=3)
    meta = _static_metadata(batch, 0, num_decodes=1, decode_rows=2, device=device)
    assert meta.static is not None
    meta.static.prefill_block_tokens += 1
    with pytest.raises(ValueError, match="work list has blocks"):
        TritonAttentionBackend(2, 1, 16, batch.scale).forward(q, k, v, batch.kv_cache, meta)


def _random_gpu_batch(paged_batch, rng, num_heads, num_kv_heads, head_dim, dtype, seed):
    num_seqs = rng.randint(1, 12)
    query_lens = [rng.choice([1, rng.randint(2, 64), rng.randint(64, 700)]) for _ in range(num_seqs)]
    prefix_lens = [rng.choice([0, rng.randint(1, 4000)]) for _ in range(num_seqs)]
    prefix_lens[0] = 16 * rng.randint(1, 40) + rng.randint(1, 15)  # never block-aligned
    return paged_batch(
        query_lens=query_lens,
        prefix_lens=prefix_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=16,
        dtype=dtype,
        seed=seed,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 32), (32, 8), (32, 4), (16, 2)])
def test_gpu_real_shapes(paged_batch, assert_close, seed, dtype, head_dim, num_heads, num_kv_heads):
    rng = random.Random(seed * 1000 + head_dim + num_kv_heads)
    batch = _random_gpu_batch(paged_batch, rng, num_heads, num_kv_heads, head_dim, dtype, seed)
    assert_close(_run(batch), _ref(batch), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_fp32(paged_batch, assert_close, head_dim):
    rng = random.Random(head_dim)
    batch = _random_gpu_batch(paged_batch, rng, 32, 8, head_dim, torch.float32, 9)
    assert_close(_run(batch), _ref(batch), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("prefix_len", [0, 1000, 4099])
def test_gpu_long_prompt(paged_batch, assert_close, prefix_len):
    batch = paged_batch(
        query_lens=[4096],
        prefix_lens=[prefix_len],
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        seed=prefix_len,
    )
    assert_close(_run(batch), _ref(batch), 1e-2)


@pytest.mark.gpu
def test_gpu_backend_mixed_batch(paged_batch, assert_close):
    batch = paged_batch(
        query_lens=[300, 1, 1, 77, 1],
        prefix_lens=[0, 2000, 17, 530, 4095],
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        seed=21,
    )
    q, k, v, meta, expected_cache, expected = _backend_case(batch, 5, seed=22)
    out = TritonAttentionBackend(32, 8, 128, batch.scale).forward(q, k, v, batch.kv_cache, meta)
    assert torch.equal(batch.kv_cache, expected_cache)
    assert_close(out, expected, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_backend_static_layout(paged_batch, assert_close, device, seed):
    rng = random.Random(seed)
    num_decodes = rng.randint(1, 200)
    query_lens = [1] * num_decodes + [rng.randint(2, 700) for _ in range(rng.randint(1, 4))]
    batch = paged_batch(
        query_lens=query_lens,
        prefix_lens=[rng.randint(0, 3000) for _ in query_lens],
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        seed=40 + seed,
    )
    q, k, v, _, expected_cache, expected = _backend_case(batch, 9, seed=50 + seed)
    # More decode rows than decodes, as in a graph; at most one per sequence of the batch.
    meta = _static_metadata(batch, 9, num_decodes=num_decodes, decode_rows=len(query_lens), device=device)
    out = TritonAttentionBackend(32, 8, 128, batch.scale).forward(q, k, v, batch.kv_cache, meta)
    assert torch.equal(batch.kv_cache, expected_cache)
    assert_close(out, expected, 1e-2)


@pytest.mark.parametrize("config", [LaunchConfig(32, 16, 1, 1), LaunchConfig(16, 32, 1, 1)])
def test_explicit_launch_config_matches_reference(paged_batch, assert_close, config):
    """Tile sizes other than the launcher's choice (what bench.prefill_sweep times) compute
    the same attention."""
    batch = paged_batch(query_lens=[37, 5], prefix_lens=[10, 21], num_heads=4, num_kv_heads=2, head_dim=32,
                        block_size=16, dtype=torch.float32, seed=60)
    out = paged_prefill_attention(batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                  batch.scale, batch.max_query_len, config=config)
    assert_close(out, _ref(batch), 1e-4)


@pytest.mark.parametrize("case", range(len(CPU_BATCHES)))
def test_fp8_cache_matches_reference(paged_batch, assert_close, case):
    """An FP8 (e4m3) cache, cached prefixes and new tokens alike: the kernel converts its
    bytes in registers, the reference reads the same rounded values."""
    query_lens, prefix_lens = CPU_BATCHES[case]
    batch = paged_batch(query_lens=query_lens, prefix_lens=prefix_lens, num_heads=4, num_kv_heads=2, head_dim=32,
                        block_size=4, dtype=torch.float32, seed=20 + case)
    batch.kv_cache = batch.kv_cache.to(torch.float8_e4m3fn)
    assert_close(_run(batch), _ref(batch), 1e-3)  # fp16 dots over FP8


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_fp8_cache_real_shapes(paged_batch, assert_close, head_dim):
    batch = paged_batch(query_lens=[1808, 512, 1, 300], prefix_lens=[0, 2048, 700, 4000], num_heads=32,
                        num_kv_heads=8, head_dim=head_dim, block_size=16, dtype=torch.bfloat16, seed=head_dim)
    batch.kv_cache = batch.kv_cache.to(torch.float8_e4m3fn)
    assert_close(_run(batch), _ref(batch), 1e-2)


@pytest.mark.parametrize("num_padding", [0, 2])
def test_fp8_backends_agree_on_a_mixed_batch(paged_batch, assert_close, num_padding):
    """An FP8 cache through both attention backends: the same bytes written (the torch
    backend's cast and the kernel's rounding agree), and the same output as the reference
    over the expected cache."""
    from loomserve.worker.attention.torch_backend import TorchAttentionBackend

    batch = paged_batch(query_lens=[7, 1, 12, 1], prefix_lens=[5, 20, 0, 3], num_heads=4, num_kv_heads=2,
                        head_dim=32, block_size=4, dtype=torch.float32, seed=13)
    batch.kv_cache = batch.kv_cache.to(torch.float8_e4m3fn)
    q, k, v, meta, _, _ = _backend_case(batch, num_padding, seed=14)
    k = k * 100  # some keys past the e4m3 range: saturated alike
    expected_cache = batch.kv_cache.clone()
    reshape_and_cache_ref(k, v, expected_cache, meta.slot_mapping)
    expected = paged_prefill_attention_ref(
        q, expected_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, batch.scale
    )
    torch_cache = batch.kv_cache.clone()
    out = TritonAttentionBackend(4, 2, 32, batch.scale).forward(q, k, v, batch.kv_cache, meta)
    torch_out = TorchAttentionBackend(4, 2, 32, batch.scale).forward(q, k, v, torch_cache, meta)
    assert torch.equal(batch.kv_cache.view(torch.uint8), expected_cache.view(torch.uint8))
    assert torch.equal(torch_cache.view(torch.uint8), expected_cache.view(torch.uint8))
    real = q.shape[0] - num_padding
    assert_close(out[:real], expected[:real], 1e-2)  # fp16 dots over FP8, scores in the hundreds
    assert_close(torch_out[:real], expected[:real], 1e-4)


# --- a KV head's query-head group packed into the rows of one tile ------------

# (num_heads, num_kv_heads): groups of 1, 2, 3 (a padding row per token), 4 and 8.
GROUPS = [(2, 2), (4, 2), (6, 2), (8, 2), (8, 1)]
# Decode rows, prefixes that are not multiples of the block size (8) and a long query.
PACKED_QUERY_LENS = [1, 6, 13, 1, 4]
PACKED_PREFIX_LENS = [0, 9, 18, 37, 3]


def _packed_batch(paged_batch, num_heads, num_kv_heads, seed, query_lens=PACKED_QUERY_LENS):
    return paged_batch(query_lens=query_lens, prefix_lens=PACKED_PREFIX_LENS[: len(query_lens)],
                       num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=16, block_size=8,
                       dtype=torch.float32, seed=seed)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), GROUPS)
def test_packed_groups_match_reference(paged_batch, assert_close, num_heads, num_kv_heads):
    batch = _packed_batch(paged_batch, num_heads, num_kv_heads, seed=70 + num_heads + num_kv_heads)
    assert_close(_run(batch), _ref(batch), 1e-4)


@pytest.mark.parametrize("block_m", [16, 32, 64])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (4, 1), (8, 1)])
def test_packed_tile_sizes_match_reference(paged_batch, assert_close, block_m, num_heads, num_kv_heads):
    """Queries of 1, 4, 8 and 9 tokens: with 4 rows a token (groups 3 and 4) they fill 4,
    16, 32 and 36 rows, so each tile size is smaller than, equal to and larger than some
    sequence's rows; with groups of 8, a 16-row tile holds 2 tokens."""
    batch = _packed_batch(paged_batch, num_heads, num_kv_heads, seed=80 + block_m, query_lens=[1, 4, 8, 9])
    config = LaunchConfig(block_m, 16, 1, 1)
    out = paged_prefill_attention(batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                  batch.scale, batch.max_query_len, config=config)
    assert_close(out, _ref(batch), 1e-4)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 1), (24, 1)])
def test_group_wider_than_the_tile(paged_batch, assert_close, num_heads, num_kv_heads):
    """A group of 32 or 24 heads (padded to 32 rows a token) against a 16-row tile: the
    launcher grows the tile to one token's rows, by default and for an explicit config."""
    batch = paged_batch(query_lens=[3, 1], prefix_lens=[5, 2], num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=16, block_size=4, dtype=torch.float32, seed=num_heads)
    expected = _ref(batch)
    assert_close(_run(batch), expected, 1e-4)
    out = paged_prefill_attention(batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                  batch.scale, batch.max_query_len, config=LaunchConfig(16, 16, 1, 1))
    assert_close(out, expected, 1e-4)


@pytest.mark.parametrize("block_m", [None, 32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (6, 2), (8, 2), (8, 1)])
def test_packed_work_list_matches_reference(paged_batch, assert_close, device, block_m, num_heads, num_kv_heads):
    """A work list in blocks of a tile's tokens (the default tile, or an explicit one and
    a list built for it) over all but the two leading decodes."""
    batch = _packed_batch(paged_batch, num_heads, num_kv_heads, seed=90 + num_heads,
                          query_lens=[1, 1, 6, 13, 4])
    config = None if block_m is None else LaunchConfig(block_m, 16, 1, 1)
    block_tokens = None if block_m is None else block_m // group_pad(_group(batch))
    work = _work(batch, 2, extra=3, device=device, block_tokens=block_tokens)
    out = torch.full_like(batch.q, 7.0)
    paged_prefill_attention(batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                            batch.scale, batch.max_query_len, out=out, work=work, config=config)
    assert torch.all(out[:2] == 7.0)
    assert_close(out[2:], _ref(batch)[2:], 1e-4)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (8, 1)])
def test_packed_fp8_cache_matches_reference(paged_batch, assert_close, num_heads, num_kv_heads):
    batch = _packed_batch(paged_batch, num_heads, num_kv_heads, seed=100 + num_heads)
    batch.kv_cache = batch.kv_cache.to(torch.float8_e4m3fn)
    assert_close(_run(batch), _ref(batch), 1e-3)  # fp16 dots over FP8


def test_default_launch_configs():
    bf16, fp32 = torch.bfloat16, torch.float32
    # One query head per KV head: rows are tokens, as before the packing.
    assert _launch_config(128, 1, 1, bf16, False) == LaunchConfig(16, 64, 4, 2)
    assert _launch_config(128, 1, 4096, bf16, False) == LaunchConfig(64, 64, 4, 2)
    assert _launch_config(64, 1, 50, bf16, False) == LaunchConfig(64, 64, 4, 2)
    assert _launch_config(64, 1, 4096, bf16, False) == LaunchConfig(128, 64, 8, 2)
    assert _launch_config(256, 1, 4096, bf16, False) == LaunchConfig(64, 32, 4, 2)
    # A decode row of a group of 4 fills 4 of 16 rows; longer queries fill 64 or 128 rows.
    assert _launch_config(128, 4, 1, bf16, False) == LaunchConfig(16, 64, 4, 2)
    assert _launch_config(128, 3, 5, bf16, False) == LaunchConfig(32, 64, 4, 2)
    assert _launch_config(128, 4, 4096, bf16, False) == LaunchConfig(64, 64, 4, 2)
    assert _launch_config(64, 8, 3, bf16, False) == LaunchConfig(32, 64, 4, 2)
    assert _launch_config(64, 4, 20, bf16, False) == LaunchConfig(64, 64, 4, 2)
    assert _launch_config(128, 4, 4096, fp32, False) == LaunchConfig(64, 32, 4, 2)
    # A group wider than the tile gets one token's rows.
    assert _launch_config(128, 128, 4096, bf16, False) == LaunchConfig(128, 64, 4, 2)
    assert _launch_config(16, 4, 100, fp32, True) == LaunchConfig(16, 16, 1, 1)
    assert _launch_config(16, 24, 100, fp32, True) == LaunchConfig(32, 16, 1, 1)


@pytest.mark.parametrize(("group", "rows_per_token"), [(1, 1), (2, 2), (3, 4), (4, 4), (8, 8), (32, 32)])
def test_block_tokens_count_tokens_not_rows(group, rows_per_token):
    for max_query_len in (1, 40, 4096):
        block_m = default_launch_config(128, max_query_len, torch.bfloat16, group=group).block_m
        assert prefill_block_tokens(128, max_query_len, torch.bfloat16, group=group) * rows_per_token == block_m


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, *(LaunchConfig(m, 64, 4, 2) for m in (16, 32, 64)),
                                    LaunchConfig(128, 64, 8, 2), LaunchConfig(128, 32, 8, 3)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 8), (32, 4)])
def test_gpu_packed_tiles(paged_batch, assert_close, config, head_dim, num_heads, num_kv_heads):
    """Groups of 4 and 8 at real head dims: decode rows and short chunks (the 16- and
    32-row tiles the launcher shrinks to) beside longer queries, under every tile size."""
    batch = paged_batch(query_lens=[1, 1, 3, 17, 200], prefix_lens=[700, 5, 33, 1000, 61], num_heads=num_heads,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=16, dtype=torch.bfloat16,
                        seed=head_dim + num_kv_heads)
    out = paged_prefill_attention(batch.q, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                  batch.scale, batch.max_query_len, config=config)
    assert_close(out, _ref(batch), 1e-2)
    short = paged_batch(query_lens=[1, 2, 1], prefix_lens=[40, 3, 17], num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, block_size=16, dtype=torch.bfloat16, seed=head_dim)
    assert_close(_run(short), _ref(short), 1e-2)
