"""bench.decode_sweep on a GPU: two configurations and the split factors of one case, both caches."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.decode_sweep import parse_config, sweep_case
from bench.harness.kernel_inputs import LLAMA_3_1_8B
from bench.harness.rooflines import copy_bandwidth
from loomserve.kernels.paged_decode_attention import DecodeConfig


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_sweep_case_times_the_default_the_grid_and_more_splits(cache: str) -> None:
    result = sweep_case(LLAMA_3_1_8B, cache, (4, 3000), copy_bandwidth("cuda", 1 << 26),
                        (DecodeConfig(64, 4, 2), DecodeConfig(32, 8, 3)))
    assert result["default"]["default"] and result["default"]["status"] == "ok"
    assert {c["num_splits"] for c in result["configs"]} == {result["default"]["num_splits"] * f for f in (1, 2, 4)}
    assert result["best"]["us"] <= result["default"]["us"]
    assert all(c["status"] in ("ok", "failed") for c in result["configs"])
    assert 0.0 < result["default"]["bandwidth_fraction"] < 1.5


def test_parse_config() -> None:
    assert parse_config("64x4x2") == DecodeConfig(64, 4, 2)
    assert parse_config("128X8X3") == DecodeConfig(128, 8, 3)
    for bad in ("64x4", "64x4x2x1", "ax4x2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_config(bad)
