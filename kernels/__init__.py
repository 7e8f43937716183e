"""Triton kernels of the GPU path.

Each module holds one kernel family side by side: the ``@triton.jit`` kernel, the
launcher that validates its arguments and starts it, and a plain torch reference
used by the tests and the benchmark. The helpers below are the argument checks
the launchers share; they only look at shapes, strides, dtypes and devices, so
they never synchronise with the device. Kernel definitions carry
``# type: ignore[no-untyped-def]`` because Triton reads parameter annotations
itself (``tl.constexpr``), so pointers and scalars stay unannotated.

The package does not import its kernel modules eagerly: whether a kernel runs
compiled or under the Triton interpreter is fixed when its module is imported
(``TRITON_INTERPRET=1`` must be set before that), so callers import the module
they need, e.g. ``from kernels.rmsnorm import rms_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
# A KV cache holds the compute dtype, or FP8 (e4m3, no scale factor: values are rounded to
# 3 mantissa bits and saturate at +-FP8_MAX). The kernels read and write an FP8 cache as
# bytes (``kv_cache_arg``) and convert in registers; torch has no FP8 arithmetic on the CPU
# and the Triton interpreter no FP8 tensors.
KV_FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def check_kv_cache_dtype(kv_cache: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise ValueError unless the cache holds ``dtype`` (the queries') or FP8."""
    if kv_cache.dtype not in (dtype, KV_FP8):
        raise ValueError(f"kv_cache has dtype {kv_cache.dtype}, expected {dtype} (the queries') or {KV_FP8}")


def kv_cache_arg(kv_cache: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel gets for ``kv_cache``: an FP8 cache as its bytes."""
    return kv_cache.view(torch.uint8) if kv_cache.dtype == KV_FP8 else kv_cache


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was built by the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return isinstance(kernel, InterpretedFunction)


def check_devices(kernel: object, **tensors: torch.Tensor) -> torch.device:
    """Check that all ``tensors`` share one device the kernel can run on; return it."""
    items = list(tensors.items())
    device = items[0][1].device
    for name, tensor in items[1:]:
        if tensor.device != device:
            raise ValueError(
                f"{name} is on {tensor.device} but {items[0][0]} is on {device}; "
                "all inputs must be on one device"
            )
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(
            f"inputs are on {device}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "set before triton and the kernel modules are imported"
        )
    return device


def check_dtype(name: str, tensor: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    """Raise ValueError unless ``tensor.dtype`` is one of ``allowed``."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} has dtype {tensor.dtype}, expected one of {names}")


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Raise ValueError unless ``tensor`` has ``len(expected)`` dims matching ``expected``
    (``None`` matches any size)."""
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        want is None or got == want for got, want in zip(shape, expected, strict=False)
    )
    if not ok:
        pretty = "(" + ", ".join("*" if d is None else str(d) for d in expected) + ")"
        raise ValueError(f"{name} has shape {shape}, expected {pretty}")


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    """Kernels address the last dimension as consecutive elements."""
    if tensor.dim() > 0 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride {tensor.stride(-1)})"
        )


def check_same_dtype(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all ``tensors`` have one dtype."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.dtype != first.dtype:
            raise ValueError(
                f"{name} has dtype {tensor.dtype} but {first_name} has {first.dtype}; "
                "they must match"
            )
