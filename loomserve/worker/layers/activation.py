"""SiLU-and-multiply of a fused gate/up projection: in torch ops, or one Triton kernel
(``kernels.activation``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` of a fused (T, 2 I) gate/up projection, in torch ops."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # (T, 2 I) -> (T, I)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonSiluAndMul(SiluAndMul):
    """:class:`SiluAndMul` through ``kernels.activation``: one kernel instead of two and
    no (T, I) intermediate."""

    def __init__(self) -> None:
        super().__init__()
        # triton is optional: see layers.norm.TritonRMSNorm.
        from loomserve.kernels.activation import silu_and_mul

        self._silu_and_mul = silu_and_mul

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(gate_up)
