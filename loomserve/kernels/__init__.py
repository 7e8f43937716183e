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
they need, e.g. ``from loomserve.kernels.rmsnorm import rms_norm``.

**Programmatic dependent launch (PDL).** On Hopper and later GPUs the kernels of a
decode step (norms, rotary, the KV write, decode attention, SiLU-and-multiply, the
one-row matmul) are launched so that each may start while the kernel before it is
still running. A batch-1 decode step is a chain of about 350 such kernels, most of
them a few microseconds long, so the gap between one kernel's end and the next one's
start is a real share of the step. The protocol, in every kernel launched this way
(``PDL`` constexpr true):

1. before ``gdc_wait()`` it reads only what no kernel writes during a forward pass
   (weights, the rotary tables), never a step's inputs or outputs;
2. ``gdc_wait()`` blocks until the previous kernel in the stream has finished and
   its writes are visible; only then does it read activations or write anything;
3. right after, ``gdc_launch_dependents()`` lets the next kernel launch, so that its
   programs become resident and run their own step 1 while this one works.

A kernel launched normally after one of these waits for it to finish, as always, so
torch and cuBLAS kernels in between need nothing. ``pdl_args`` gives a launch its
flags; ``set_pdl(False)``, or ``LOOMSERVE_PDL=0`` in the environment, turns PDL off
(for comparisons, or a driver that mishandles it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

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


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the cache stores it: cast, or for FP8 its bytes, rounded to nearest, saturated
    at +-FP8_MAX and with NaN stored as 0, as the kernels' writers store it.

    The clamp is explicit because torch's own cast past the range differs between versions:
    torch 2.13's saturates, 2.11's (the GPU image's) gives NaN. NaN is stored as 0 so that
    every writer (the kernels, their references, the torch backend) stores the same bytes,
    and an FP8 cache never holds a NaN that a later reader could weight by zero and still get
    NaN.
    """
    if cache_dtype != KV_FP8:
        return x.to(cache_dtype)
    return torch.nan_to_num(x, nan=0.0).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8).view(torch.uint8)


@cache
def _interpreted_function() -> type:
    # Imported on first use: the torch paths (the CPU worker) use this package's helpers
    # and must not need triton, which only the GPU extra installs.
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was built by the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return isinstance(kernel, _interpreted_function())


_pdl_allowed = os.environ.get("LOOMSERVE_PDL", "1") != "0"


def set_pdl(enabled: bool) -> None:
    """Allow (the default) or forbid programmatic dependent launch in later launches. Launches
    already captured in a CUDA graph keep what they had."""
    global _pdl_allowed
    _pdl_allowed = enabled


@cache
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_args(kernel: object, device: torch.device) -> dict[str, Any]:
    """Launch keyword arguments for a kernel that follows the module's PDL protocol: its
    ``PDL`` constexpr, and the launch attribute itself where the GPU supports it (compute
    capability 9.0 on), the kernel is compiled (not interpreted) and PDL is allowed."""
    on = (
        _pdl_allowed
        and device.type == "cuda"
        and not is_interpreted(kernel)
        and _supports_pdl(device.index if device.index is not None else torch.cuda.current_device())
    )
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


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
