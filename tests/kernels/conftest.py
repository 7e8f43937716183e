"""Where the kernel tests run.

With CUDA they run compiled on the GPU. Without it they run under the Triton CPU
interpreter, which ``tests/conftest.py`` chooses before any test module imports
Triton. Tests marked ``gpu`` (large shapes, 16-bit dtypes) skip without CUDA.

Helpers reach the tests as fixtures rather than imports, so the tests do not
depend on how pytest names this directory's modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()


_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if ON_GPU:
        return
    # The interpreter converts 1-element arrays to ints in a way numpy deprecates;
    # nothing in these tests can act on it.
    ignore = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(ignore)


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") is not None and not ON_GPU:
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


def _assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """``max|out - ref| <= rel * max|ref|``; the error is relative to the largest
    reference value so near-zero elements do not dominate."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().clamp_min(1e-6).item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} * max|ref| {scale:.3e}"


@pytest.fixture
def assert_close() -> Callable[[torch.Tensor, torch.Tensor, float], None]:
    """``assert_close(out, ref, rel)``: max abs error within ``rel`` of max |ref|."""
    return _assert_close


@dataclass
class PagedBatch:
    """A flattened batch over a randomly filled paged KV cache."""

    q: torch.Tensor  # (T, H, D)
    kv_cache: torch.Tensor  # (2, num_blocks, block_size, KVH, D)
    query_start_loc: torch.Tensor  # (B + 1,) int32
    seq_lens: torch.Tensor  # (B,) int32
    block_tables: torch.Tensor  # (B, max_blocks) int32
    slot_mapping: torch.Tensor  # (T,) int64, slots of the new tokens
    query_lens: list[int]
    scale: float

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens.tolist(), default=0)


def make_paged_batch(
    *,
    query_lens: list[int],
    prefix_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    spare_blocks: int = 3,
) -> PagedBatch:
    """Random queries and a random cache whose blocks are scattered over the pool:
    each sequence gets a random, non-contiguous set of physical blocks and its block
    table row is padded with arbitrary (in-range) block ids past its length."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq, default=0) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = perm[used : used + n]
        used += n
    # Drawn on the device in the target dtype: GPU-sized caches are gigabytes.
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    kv_cache = torch.randn(
        (2, num_blocks, block_size, num_kv_heads, head_dim),
        generator=dev_gen,
        dtype=dtype,
        device=device,
    )
    num_tokens = sum(query_lens)
    q = torch.randn(
        (num_tokens, num_heads, head_dim), generator=dev_gen, dtype=dtype, device=device
    )
    slots = []
    for i, (p, s) in enumerate(zip(prefix_lens, seq_lens, strict=True)):
        pos = torch.arange(p, s)
        slots.append(block_tables[i, pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(
        q=q,
        kv_cache=kv_cache,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(torch.int32).to(device),
        slot_mapping=slot_mapping.to(torch.int64).to(device),
        query_lens=list(query_lens),
        scale=head_dim**-0.5,
    )


@pytest.fixture
def paged_batch(device: torch.device) -> Callable[..., PagedBatch]:
    """Factory of :class:`PagedBatch` on the test device."""

    def make(**kwargs: object) -> PagedBatch:
        return make_paged_batch(device=device, **kwargs)  # type: ignore[arg-type]

    return make
