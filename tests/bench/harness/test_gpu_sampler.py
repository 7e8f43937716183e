"""NVML sampling: the window arithmetic, and a machine without NVML."""

from __future__ import annotations

import pytest

from bench.harness.gpu_sampler import GpuSampler


def test_gpu_utilisation_over_the_timed_window_only() -> None:
    sampler = GpuSampler()
    sampler.util, sampler.times, sampler.mem_used = [0.0, 0.0, 90.0, 80.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], [1 << 30]
    assert sampler.summary()["gpu_util_mean_pct"] == pytest.approx(34.0)
    windowed = sampler.summary((2.5, 4.0))
    assert windowed["gpu_util_mean_pct"] == pytest.approx(85.0) and windowed["gpu_util_samples"] == 2
    assert sampler.summary((6.0, 7.0))["gpu_util_mean_pct"] is None
    assert sampler.summary()["gpu_mem_used_max_gib"] == 1.0


def test_without_nvml_nothing_fails() -> None:
    with GpuSampler(interval_s=0.01) as sampler:
        pass
    summary = sampler.summary()
    if sampler.error is not None:  # no pynvml or no driver here: say so, sample nothing
        assert "GPU utilisation not sampled" in sampler.error
        assert summary == {"gpu_util_mean_pct": None, "gpu_util_samples": 0, "gpu_mem_used_max_gib": None,
                           "gpu_sampler_error": sampler.error}
