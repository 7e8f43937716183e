"""TorchAttentionBackend against a naive dense reference on random paged batches."""

from __future__ import annotations

import random

import pytest
import torch

from loomserve.kernels.reshape_and_cache import reshape_and_cache_ref
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.attention.torch_backend import TorchAttentionBackend

HEAD_DIM = 16
NUM_BLOCKS = 64


def make_batch(
    rng: random.Random,
    query_lens: list[int],
    prefix_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    num_padding: int = 0,
):
    """A random paged batch: cache with the prefixes written, new q/k/v, metadata.

    Returns (q, k, v, kv_cache, meta, contexts) where ``contexts[i]`` is the
    dense (seq_len, KV, D) keys and values of sequence i, prefix and new tokens.
    """
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    kv_cache = torch.randn(2, NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM, generator=gen)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)  # scattered, out-of-order block ids
    tables, slots, contexts = [], [], []
    qs, ks, vs = [], [], []
    for n, prefix in zip(query_lens, prefix_lens, strict=True):
        seq_len = prefix + n
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        keys = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
        values = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
        for pos in range(prefix):  # the cached prefix is already in the cache
            kv_cache[0, table[pos // block_size], pos % block_size] = keys[pos]
            kv_cache[1, table[pos // block_size], pos % block_size] = values[pos]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(prefix, seq_len)]
        qs.append(torch.randn(n, num_heads, HEAD_DIM, generator=gen))
        ks.append(keys[prefix:])
        vs.append(values[prefix:])
        tables.append(table)
        contexts.append((keys, values))
    for _ in range(num_padding):
        qs.append(torch.randn(1, num_heads, HEAD_DIM, generator=gen))
        ks.append(torch.randn(1, num_kv_heads, HEAD_DIM, generator=gen))
        vs.append(torch.randn(1, num_kv_heads, HEAD_DIM, generator=gen))
        slots.append(-1)
    width = max(len(t) for t in tables)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens, strict=True)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), kv_cache, meta, contexts


def naive_attention(q, meta, contexts, num_heads, num_kv_heads, scale):
    """Row by row, in float64: new token j of sequence i sees context positions <= prefix + j."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = num_heads // num_kv_heads
    starts = meta.query_start_loc_cpu
    for i, (keys, values) in enumerate(contexts):
        n = starts[i + 1] - starts[i]
        prefix = meta.seq_lens_cpu[i] - n
        for j in range(n):
            row = starts[i] + j
            for h in range(num_heads):
                k = keys[: prefix + j + 1, h // group].double()  # (S, D)
                v = values[: prefix + j + 1, h // group].double()
                weights = torch.softmax(k @ q[row, h].double() * scale, dim=0)  # (S,)
                out[row, h] = weights @ v
    return out


def run_case(seed, query_lens, prefix_lens, num_heads, num_kv_heads, block_size, num_padding=0):
    rng = random.Random(seed)
    q, k, v, kv_cache, meta, contexts = make_batch(
        rng, query_lens, prefix_lens, num_heads, num_kv_heads, block_size, num_padding
    )
    before = kv_cache.clone()
    scale = HEAD_DIM**-0.5
    backend = TorchAttentionBackend(num_heads, num_kv_heads, HEAD_DIM, scale)
    out = backend.forward(q, k, v, kv_cache, meta)
    assert out.shape == q.shape

    expected = naive_attention(q, meta, contexts, num_heads, num_kv_heads, scale)
    rows = meta.query_start_loc_cpu[-1]
    torch.testing.assert_close(out[:rows].double(), expected[:rows], atol=1e-5, rtol=1e-5)
    assert torch.all(out[rows:] == 0)  # padding rows

    # Exactly the valid slots were written, with the new keys and values.
    flat_before = before.view(2, -1, num_kv_heads, HEAD_DIM)
    flat_after = kv_cache.view(2, -1, num_kv_heads, HEAD_DIM)
    slots = meta.slot_mapping.tolist()
    written = [s for s in slots if s >= 0]
    untouched = sorted(set(range(flat_after.shape[1])) - set(written))
    assert torch.equal(flat_after[:, untouched], flat_before[:, untouched])
    valid_rows = [r for r, s in enumerate(slots) if s >= 0]
    assert torch.equal(flat_after[0, written], k[valid_rows])
    assert torch.equal(flat_after[1, written], v[valid_rows])


HEADS = [(4, 4), (6, 2), (8, 2)]  # GQA ratios 1, 3, 4


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_only(seed, num_heads, num_kv_heads, block_size):
    rng = random.Random(seed)
    batch = rng.randint(1, 6)
    prefix_lens = [rng.randint(0, 40) for _ in range(batch)]
    prefix_lens[0] = 0  # a decode with no cached context at all
    run_case(seed, [1] * batch, prefix_lens, num_heads, num_kv_heads, block_size)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch(seed, num_heads, num_kv_heads, block_size):
    """Decodes, fresh prefills and extends over a cached prefix in one flattened batch."""
    rng = random.Random(100 + seed)
    query_lens, prefix_lens = [], []
    for kind in rng.sample(["decode", "decode", "prefill", "extend", "extend"], k=5):
        if kind == "decode":
            query_lens.append(1)
            prefix_lens.append(rng.randint(1, 30))
        elif kind == "prefill":
            query_lens.append(rng.randint(2, 20))
            prefix_lens.append(0)
        else:
            query_lens.append(rng.randint(2, 12))
            prefix_lens.append(rng.randint(1, 30))
    run_case(seed, query_lens, prefix_lens, num_heads, num_kv_heads, block_size)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
def test_single_prefill_and_block_aligned_prefix(num_heads, num_kv_heads):
    run_case(0, [13], [0], num_heads, num_kv_heads, 4)
    run_case(1, [5], [8], num_heads, num_kv_heads, 4)  # prefix ends on a block boundary


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 7, 1]])
def test_padding_rows_are_not_written(query_lens):
    """Rows after the last sequence have slot -1: nothing written, output zero."""
    run_case(3, query_lens, [5, 9, 0], 6, 2, 4, num_padding=3)


def test_sequence_without_new_tokens():
    run_case(4, [3, 0, 1], [2, 6, 4], 4, 2, 4)


def test_plan_is_rebuilt_for_a_new_batch():
    """The per-batch plan is shared by all layers but never reused across batches."""
    run_case(5, [1, 1], [3, 7], 4, 2, 4)
    run_case(5, [1, 1], [3, 7], 4, 2, 4)  # equal contents, new metadata object
    run_case(6, [4, 1], [3, 7], 4, 2, 4)


def test_many_layers_share_a_plan():
    rng = random.Random(7)
    q, k, v, kv_cache, meta, _ = make_batch(rng, [1, 6, 1], [9, 3, 0], 8, 2, 4)
    backend = TorchAttentionBackend(8, 2, HEAD_DIM, HEAD_DIM**-0.5)
    other = TorchAttentionBackend(8, 2, HEAD_DIM, HEAD_DIM**-0.5)
    first = backend.forward(q, k, v, kv_cache.clone(), meta)
    second = other.forward(q, k, v, kv_cache.clone(), meta)
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_fp8_cache_is_written_like_the_kernels_write_it():
    """With an FP8 cache the backend stores what ``reshape_and_cache_ref`` stores (rounded,
    saturated, NaN as 0) and attends over the stored values."""
    rng = random.Random(5)
    q, k, v, kv_cache, meta, _ = make_batch(rng, [3, 1], [5, 18], 8, 2, 4)
    k[0, 1, :2] = float("nan")
    v[2, 0, 3] = float("nan")
    v[1, 1, 0] = 1e4  # past the FP8 range: saturated, not NaN
    cache = kv_cache.to(torch.float8_e4m3fn)
    expected = cache.clone()
    reshape_and_cache_ref(k, v, expected, meta.slot_mapping)
    backend = TorchAttentionBackend(8, 2, HEAD_DIM, HEAD_DIM**-0.5)
    out = backend.forward(q, k, v, cache, meta)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    assert not cache.float().isnan().any() and out.isfinite().all()
    # Attention over the stored values: the float32 backend over the cache widened back.
    widened = cache.float()
    reference = TorchAttentionBackend(8, 2, HEAD_DIM, HEAD_DIM**-0.5).forward(q, k, v, widened, meta, kv_written=True)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
