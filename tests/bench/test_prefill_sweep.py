"""bench.prefill_sweep on a GPU: two configurations of one case, both checked and timed."""

from __future__ import annotations

import pytest
import torch

from bench.harness.kernel_inputs import LLAMA_3_1_8B
from bench.prefill_sweep import sweep_case
from loomserve.kernels.paged_prefill_attention import LaunchConfig


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sweep_case_times_the_default_and_the_grid() -> None:
    result = sweep_case(LLAMA_3_1_8B, (2, 300, 100), (LaunchConfig(64, 64, 4, 2), LaunchConfig(128, 32, 8, 3)))
    assert result["default"]["default"] and result["default"]["status"] == "ok"
    assert len(result["configs"]) >= 2
    assert result["best"]["us"] <= result["default"]["us"]
    assert all(c["status"] in ("ok", "failed") for c in result["configs"])
