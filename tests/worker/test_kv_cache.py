"""KV-cache sizing agrees with what the allocation takes."""

from __future__ import annotations

import pytest
import torch

from loomserve.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from loomserve.worker.loader.dummy import dummy_config


@pytest.mark.parametrize(("dtype", "num_kv_heads"), [(torch.bfloat16, None), (torch.float8_e4m3fn, 1)])
def test_a_block_costs_what_the_caches_allocate_for_it(dtype: torch.dtype, num_kv_heads: int | None) -> None:
    config = dummy_config("llama-tiny")
    caches = allocate_kv_caches(config, 3, 4, dtype, "cpu", num_kv_heads)
    heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    assert len(caches) == config.num_layers
    assert all(c.shape == (2, 3, 4, heads, config.head_dim) and c.dtype == dtype for c in caches)
    assert all(not c.view(torch.uint8).any() for c in caches)  # zeroed: no NaN left in fresh memory
    assert sum(c.numel() * c.element_size() for c in caches) == 3 * kv_cache_bytes_per_block(config, 4, dtype,
                                                                                               num_kv_heads)
