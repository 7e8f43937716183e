"""Device memory between runs: freed after one, and given back by other processes before the
next, so that each run sizes its KV cache on the same free GPU."""

from __future__ import annotations

import gc
import logging
import time

import torch

logger = logging.getLogger(__name__)


def free_device_memory(device: str) -> None:
    """Collect the objects of a finished run and return their cached device memory."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gpu_bytes_in_use(device: str) -> int:
    """Device memory in use by every process (0 on the CPU)."""
    if device != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def wait_gpu_released(device: str, baseline: int, timeout_s: float = 60.0) -> None:
    """Wait until other processes (a stopped server's worker) have given their device memory
    back: at most 1 GiB more in use than ``baseline``."""
    deadline = time.monotonic() + timeout_s
    while gpu_bytes_in_use(device) > baseline + (1 << 30):
        if time.monotonic() > deadline:
            logger.warning("%.1f GiB of device memory still in use %.0f s after the server stopped",
                           gpu_bytes_in_use(device) / (1 << 30), timeout_s)
            return
        time.sleep(0.5)
