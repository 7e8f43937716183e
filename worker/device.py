"""Which device and dtype a worker computes on, and how much memory its KV cache gets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.config import WorkerConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Kept free on a GPU for activations, logits and the allocator's slack.
_GPU_ACTIVATION_RESERVE = 2 << 30


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, config: WorkerConfig) -> DeviceInfo:
        name = config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        if config.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[config.dtype]
        return cls(device, dtype)

    def kv_cache_bytes(self, config: WorkerConfig) -> int:
        """Bytes for the KV cache; on a GPU, measured after the weights are loaded."""
        if self.device.type != "cuda":
            return int(config.kv_cache_gb * (1 << 30))
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        return max(0, int(total * config.gpu_memory_utilization) - used - _GPU_ACTIVATION_RESERVE)

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} ({self.device}, {self.dtype})"
        return f"cpu ({torch.get_num_threads()} threads, {self.dtype})"
