"""What the machine can do, measured at the start of a run: the ceilings that figures are held
against (a bf16 matmul's FLOP/s, a device-to-device copy's bytes/s)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

COPY_BYTES = 2 << 30


def median_seconds(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one call of ``fn`` after ``warmup`` untimed calls: CUDA events around
    the call on a GPU (the device's time, not the launch's), the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    on_gpu = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if on_gpu:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000.0)
        else:
            begin_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin_s)
    return statistics.median(times)


def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of one ``n`` x ``n`` matrix product in ``dtype``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    return 2.0 * n**3 / median_seconds(lambda: torch.matmul(a, b, out=out), device, 10)


def copy_bandwidth(device: torch.device | str, nbytes: int = COPY_BYTES, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes``, counting bytes read plus bytes written
    (both are DRAM traffic, as a kernel's reads are)."""
    seconds = _copy_seconds(device, nbytes, repeats)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the two buffers, freed on return: a run's KV cache is sized after this
    return 2 * nbytes / seconds


def _copy_seconds(device: torch.device | str, nbytes: int, repeats: int) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), device, repeats)
