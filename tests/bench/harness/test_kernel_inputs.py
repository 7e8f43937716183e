"""Paged inputs of the kernel benchmarks, built on the CPU."""

from __future__ import annotations

import torch

from bench.harness.kernel_inputs import LLAMA_3_1_8B, LayerShape, make_paged_inputs

TINY = LayerShape("tiny", num_heads=4, num_kv_heads=2, head_dim=8, hidden=32, intermediate=40, vocab=100)


def test_projections_of_a_decode_step() -> None:
    assert dict((name, (out, inp)) for name, out, inp in LLAMA_3_1_8B.projections()) == {
        "qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
        "down_proj": (4096, 14336), "lm_head": (128256, 4096)}


def test_each_sequence_owns_its_blocks() -> None:
    p = make_paged_inputs(TINY, [3, 1], [5, 12], block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert p.seq_lens_cpu == [8, 13] and p.query_start_loc_cpu == [0, 3, 4]
    assert p.q.shape == (4, 4, 8) and p.kv_cache.shape == (2, 2 + 4, 4, 2, 8)
    tables = p.block_tables.tolist()
    owned = tables[0][:2] + tables[1][:4]
    assert sorted(owned) == list(range(6))  # every block used once
    assert p.scale == 8**-0.5
