"""GPU utilisation and memory in use, sampled from NVML while a timed run goes on."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import numpy as np
import torch

INTERVAL_S = 0.1


class GpuSampler:
    """NVML utilization.gpu and memory in use, sampled by a thread every ``interval_s`` while
    inside ``with``: of the GPU torch uses, or with ``num_devices`` > 1 the mean over GPUs
    0 to ``num_devices`` - 1 (a tensor-parallel group; memory: the largest). Where NVML cannot
    be had (no pynvml, no NVIDIA driver) it samples nothing and ``error`` says why; nothing
    else fails."""

    def __init__(self, num_devices: int = 1, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.error: str | None = None
        self.util: list[float] = []
        self.times: list[float] = []  # time.perf_counter() of each util sample
        self.mem_used: list[int] = []
        self._handles: list[Any] = []
        self._nvml: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = ([self._device_handle(pynvml)] if num_devices == 1 else
                             [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(num_devices)])
        except ImportError:
            self.error = "pynvml is not installed (pip install nvidia-ml-py): GPU utilisation not sampled"
        except Exception as exc:  # NVMLError and its many subclasses: no driver, no device
            self.error = f"NVML unavailable ({type(exc).__name__}: {exc}): GPU utilisation not sampled"

    @staticmethod
    def _device_handle(pynvml: Any) -> Any:
        """The handle of the GPU torch uses: by UUID, else the first visible index."""
        if torch.cuda.is_available():
            uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
            if uuid is not None:
                with contextlib.suppress(Exception):
                    return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        return pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)

    def __enter__(self) -> GpuSampler:
        if self._handles:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                nvml = self._nvml
                self.util.append(float(np.mean([nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles])))
                self.times.append(time.perf_counter())
                self.mem_used.append(max(int(nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles))
            except Exception as exc:
                self.error = f"NVML sampling failed: {exc}"
                return
            self._stop.wait(self.interval_s)

    def summary(self, window: tuple[float, float] | None = None) -> dict[str, Any]:
        """Mean utilisation over the samples taken inside ``window`` (``time.perf_counter()``
        readings; None: all of them), so that what ran before the timed part (a benchmark's
        client processes starting) does not dilute it."""
        util = self.util if window is None else [u for u, t in zip(self.util, self.times, strict=True)
                                                 if window[0] <= t <= window[1]]
        return {
            "gpu_util_mean_pct": float(np.mean(util)) if util else None,
            "gpu_util_samples": len(util),
            "gpu_mem_used_max_gib": max(self.mem_used) / (1 << 30) if self.mem_used else None,
            "gpu_sampler_error": self.error,
        }
