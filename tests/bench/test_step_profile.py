"""bench.step_profile: kernel families, the synthetic steps and their work, and a smoke run."""

from __future__ import annotations

import json

import numpy as np
import torch

from bench import step_profile
from bench.harness.model_costs import ShapeCosts
from bench.step_profile import CASES, OTHER, Case, build_step, family_of, step_work


def test_kernel_families() -> None:
    assert family_of("_paged_prefill_kernel") == "prefill attention"
    assert family_of("_decode_combine_kernel") == "decode attention"
    assert family_of("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT") == "matmul"
    assert family_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert family_of("_fused_add_rms_norm_kernel") == "RMSNorm"
    assert family_of("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "all-reduce"
    assert family_of("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == OTHER


def test_steps_are_laid_out_as_the_runner_does() -> None:
    case = Case("t", 3, 10, ((5, 0), (4, 7)))
    step = build_step(case, block_size=4, num_blocks=64, vocab=100)
    assert step.query_start_loc.tolist() == [0, 1, 2, 3, 8, 12]
    assert step.seq_lens.tolist() == [10, 10, 10, 5, 11]
    assert step.sample_rows.tolist() == [0, 1, 2, 7, 11]
    # Decodes sit at the last position of their context; every slot is distinct and in its block.
    assert step.token_data[1, :3].tolist() == [9, 9, 9] and step.token_data[1, 8:].tolist() == [7, 8, 9, 10]
    slots = step.token_data[2]
    assert len(set(slots.tolist())) == len(slots)
    starts = step.query_start_loc
    for i in range(len(step.seq_lens)):
        pos = step.token_data[1, starts[i] : starts[i + 1]]
        assert np.array_equal(slots[starts[i] : starts[i + 1]] // 4, step.block_tables[i, pos // 4])


def test_step_work() -> None:
    costs = ShapeCosts.of("llama-3.1-8b", torch.bfloat16)
    c = costs.config
    work = step_work(Case("t", 2, 100, ((3, 5),)), costs, num_tokens=5, num_sampled=3)
    assert work["matmul_flops"] == 2 * 5 * c.num_layers * costs.layer_linear_params + 2 * 3 * costs.embedding_params
    assert work["prefill_attention_flops"] == 4 * c.num_layers * c.q_size * (6 + 7 + 8)  # keys seen by each query
    assert work["decode_attention_bytes"] == c.num_layers * 2 * 100 * 2 * c.kv_size * 2


def test_smoke_run(tmp_path) -> None:
    out = tmp_path / "profile.json"
    assert step_profile.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cases = result["shapes"][0]["cases"]
    assert [c["case"] for c in cases] == [c.name for c in CASES]
    for c in cases:
        assert c["served_as"] == "eager" and c["served_ms"] > 0 and c["matmul_flops"] > 0
