"""RMSNorm with the residual add folded in: in torch ops, or one Triton kernel (``kernels.rmsnorm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(norm(x + residual), x + residual)``; the sum is the next residual."""
        if residual is not None:
            x = x + residual  # (T, hidden)
        # One fused op (the six-op formula costs ~20 us a call on the CPU); it
        # normalises in fp32 and is bit-identical to the reference models in fp32.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x


class TritonRMSNorm(RMSNorm):
    """:class:`RMSNorm` through ``kernels.rmsnorm``: the residual add and the norm in
    one pass over the activations instead of three kernels."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        # Imported here, not at the top: triton is an optional dependency that only models
        # built for a GPU need.
        from loomserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm

        self._rms_norm = rms_norm
        self._fused_add_rms_norm = fused_add_rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps), x
        return self._fused_add_rms_norm(x, residual, self.weight, self.eps)
