"""The machine's ceilings, measured here on the CPU (on a GPU the same code times with CUDA events)."""

from __future__ import annotations

import pytest
import torch

from bench.harness.rooflines import copy_bandwidth, matmul_peak_flops, median_seconds


def test_median_after_warmup() -> None:
    calls: list[int] = []
    seconds = median_seconds(lambda: calls.append(1), "cpu", repeats=5, warmup=2)
    assert len(calls) == 7 and 0 <= seconds < 0.1


def test_cpu_ceilings_are_positive() -> None:
    assert matmul_peak_flops("cpu", torch.float32, 64) > 0
    assert copy_bandwidth("cpu", 1 << 20, repeats=3) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_copy_bandwidth_is_plausible() -> None:
    assert 1e11 < copy_bandwidth("cuda", 1 << 28) < 2e13  # bytes read + written per second
