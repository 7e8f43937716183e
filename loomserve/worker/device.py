"""Which device and dtype a worker computes on, which kernels it uses there, and how
much memory its KV cache gets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loomserve.shared.config import WorkerConfig
from loomserve.worker.attention.base import AttentionBackend
from loomserve.worker.attention.torch_backend import TorchAttentionBackend

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, config: WorkerConfig) -> DeviceInfo:
        """``config.device``; "cuda" without an index is the first GPU (the group
        launcher gives each of its ranks an explicit one)."""
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

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def attention_backend(self) -> type[AttentionBackend]:
        """The Triton paged-attention kernels on a GPU, the torch reference elsewhere."""
        if self.is_cuda:
            # Imported only here: triton is an optional dependency that only GPUs need.
            from loomserve.worker.attention.triton_backend import TritonAttentionBackend

            return TritonAttentionBackend
        return TorchAttentionBackend

    def kv_cache_bytes(self, config: WorkerConfig, reserved_bytes: int = 0) -> int:
        """Bytes for the KV cache.

        On the CPU, ``config.kv_cache_gb``. On a GPU, what is left of
        ``gpu_memory_utilization`` of the card after what is in use now (call it once
        the weights are loaded) and ``reserved_bytes``, the caller's measured need for
        activations and CUDA graphs.
        """
        if not self.is_cuda:
            return int(config.kv_cache_gb * (1 << 30))
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        return max(0, int(total * config.gpu_memory_utilization) - used - reserved_bytes)

    def describe(self) -> str:
        if self.is_cuda:
            return f"{torch.cuda.get_device_name(self.device)} ({self.device}, {self.dtype})"
        return f"cpu ({torch.get_num_threads()} threads, {self.dtype})"
