"""Device memory between runs; on the CPU there is none to wait for."""

from __future__ import annotations

import time

import pytest
import torch

from bench.harness.device_memory import free_device_memory, gpu_bytes_in_use, wait_gpu_released


def test_cpu_has_nothing_to_free_or_wait_for() -> None:
    free_device_memory("cpu")
    assert gpu_bytes_in_use("cpu") == 0
    begin = time.monotonic()
    wait_gpu_released("cpu", 0)
    assert time.monotonic() - begin < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_freed_memory_is_seen_as_released() -> None:
    baseline = gpu_bytes_in_use("cuda")
    block = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    assert gpu_bytes_in_use("cuda") >= baseline + (2 << 30)
    del block
    free_device_memory("cuda")
    wait_gpu_released("cuda", baseline, timeout_s=5)
    assert gpu_bytes_in_use("cuda") <= baseline + (1 << 30)
